"""``python -m vlmtune`` (and ``torchrun ... -m vlmtune fit ...``): the command line."""

import sys

from vlmtune.cli import main

sys.exit(main())
