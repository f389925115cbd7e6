"""Capacity service: fleet and per-model capacity with the precedence tier it came from."""
