"""``python -m tools.compare_official ...`` (run from the repository root): see :mod:`tools.compare_official.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
