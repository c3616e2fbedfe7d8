"""The wrapper wing: what runs before every job (hot path). Imports only the core and builtins."""
