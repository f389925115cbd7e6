"""`python -m services.capacity`: load config (a bad field fails start), log, run until SIGTERM."""

from __future__ import annotations

import sys

from services.capacity.config import load
from services.capacity.main import serve
from services.common.run import service_main

if __name__ == "__main__":
    sys.exit(service_main("capacity", load, serve))
