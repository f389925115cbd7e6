"""`python -m services.cli`: the `switchboard` command."""

import sys

from services.cli.main import main

sys.exit(main())
