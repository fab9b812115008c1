"""Code shared by the gateway and the worker: settings, schemas, job store, storage. Never imports torch."""
