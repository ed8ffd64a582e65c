"""`python -m raysift ...` is the `raysift` command."""

import sys

from raysift.jobs.cli import main

sys.exit(main())
