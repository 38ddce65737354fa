"""``python -m maskdino <command>``: see :mod:`maskdino.cli`."""

import sys

from maskdino.cli import main

if __name__ == "__main__":
    sys.exit(main())
