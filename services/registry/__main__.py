"""`python -m services.registry`: load config (a bad field fails start), log, run until SIGTERM."""

from __future__ import annotations

import os
import sys

from services.common.errors import ConfigError
from services.common.logging import setup_logging
from services.common.run import run_service
from services.registry.config import load
from services.registry.main import serve


def main() -> int:
    try:
        cfg = load(sys.argv[1:], os.environ)
    except ConfigError as exc:
        print(f"registry: {exc}", file=sys.stderr)
        return 2
    setup_logging("registry", cfg.log_level, cfg.log_format)
    return run_service(lambda stop: serve(cfg, stop))


if __name__ == "__main__":
    sys.exit(main())
