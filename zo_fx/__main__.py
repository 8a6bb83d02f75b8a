"""``python -m zo_fx``: the same command line as ``zo-fx``."""

import sys

from zo_fx.cli import main

sys.exit(main())
