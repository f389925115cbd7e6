"""`python -m services.router`: load config (a bad field fails start), log, run until SIGTERM."""

from __future__ import annotations

import sys

from services.common.run import service_main
from services.router.config import load
from services.router.main import serve

if __name__ == "__main__":
    sys.exit(service_main("router", load, serve))
