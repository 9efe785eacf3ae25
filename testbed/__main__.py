"""``python -m testbed`` is the ``pinhole`` command (used where the console script may not be on PATH)."""

import sys

from testbed.cli import main

sys.exit(main())
