"""The master's connection limits: `rackboot serve`'s defaults, kept apart from serve.py so
the CLI can show them without importing http.server (every `rackboot build` would pay for it)."""

IDLE_TIMEOUT = 30.0  # seconds one read or write on a connection may wait for the client
MAX_CONNECTIONS = 256  # connections served at once, each with its thread
MAX_STREAMS = 8  # image streams sent at once ([master] max_streams): past it, 503 with Retry-After
