"""The `switchboard` command: up (stack, supervisor, nats-server), status, drain, tail."""
