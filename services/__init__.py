"""Switchboard services: registry, capacity, worker, router, and their shared plumbing."""
