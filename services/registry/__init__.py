"""Registry service: the durable, race-free source of truth for which workers exist."""
