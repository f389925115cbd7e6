"""Admission: a pure slot-and-queue core and the asyncio gate around it (gateway and workers)."""
