"""`python -m services.registry`: load config (a bad field fails start), log, run until SIGTERM."""

from __future__ import annotations

import sys

from services.common.run import service_main
from services.registry.config import load
from services.registry.main import serve

if __name__ == "__main__":
    sys.exit(service_main("registry", load, serve))
