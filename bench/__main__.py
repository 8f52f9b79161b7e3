"""``python -m bench ARGS`` is ``nearstore bench ARGS``."""

import sys

from bench.cli import main

sys.exit(main(sys.argv[1:]))
