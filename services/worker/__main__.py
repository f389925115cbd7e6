"""`python -m services.worker`: load config (a bad field fails start), log, run until SIGTERM."""

from __future__ import annotations

import sys

from services.common.run import service_main
from services.worker.config import load
from services.worker.main import serve

if __name__ == "__main__":
    sys.exit(service_main("worker", load, serve))
