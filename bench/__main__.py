"""``python -m nearstore.bench ARGS`` is ``nearstore bench ARGS``."""

import sys

from nearstore.bench.cli import main

sys.exit(main(sys.argv[1:]))
