"""The Fluxgate gateway: a stateless FastAPI app that validates jobs and enqueues them by task name."""
