"""``python -m kubetune.operator``: the same as ``kubetune operator``."""

import sys

from kubetune.operator.cli import main

if __name__ == "__main__":
    sys.exit(main())
