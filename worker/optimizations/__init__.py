"""Load-time optimisations, one module per technique: apply_x(pipe, config)."""
