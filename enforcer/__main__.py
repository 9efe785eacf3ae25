"""``python -m enforcer``: the enforcer's commands alone (enforcer.cli)."""

import sys

from enforcer.cli import main

sys.exit(main())
