"""``python -m dualunlearn ...`` is the ``dualunlearn`` command."""

import sys

from dualunlearn.cli import main

sys.exit(main())
