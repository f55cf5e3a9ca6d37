"""``python -m dfquant.cli``."""

import sys

from dfquant.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
