"""End-to-end serving benchmark on a GPU machine: the whole stack, driven by ``fluxgate bench serving``.

``python -m bench.e2e`` (``bench.e2e.run``) is the driver; ``bench/e2e/fetch.sh`` fetches what it carries.
"""
