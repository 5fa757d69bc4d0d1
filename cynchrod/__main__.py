"""``python -m cynchrod`` is the ``cynchrod`` command."""

import sys

from cynchrod.cli import main

sys.exit(main())
