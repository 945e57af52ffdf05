"""``python -m lowdose.server``: the same as ``lowdose serve``."""

import sys

from .launcher import main

sys.exit(main())
