"""``python -m nearstore.bench.skewclock SECONDS ARGS...``: ``nearstore
ARGS...`` with its wall clock SECONDS ahead (negative: behind).

The fault table's "peer clock skew" row needs a node whose clock is wrong
without touching the machine's (other processes share it, and setting it
needs privileges the bench should not ask for); libfaketime is not
installed everywhere. Peer requests are signed and checked with
``time.time()`` (cache/peers.py), which this shifts for the whole process
before nearstore is imported; the S3 front's SigV4 check reads
``datetime.now`` and keeps the true time, so clients are unaffected by a
skew under its 15 minutes.
"""

from __future__ import annotations

import runpy
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m nearstore.bench.skewclock SECONDS nearstore-args...", file=sys.stderr)
        return 2
    skew = float(argv[0])
    true_time = time.time
    time.time = lambda: true_time() + skew
    # Run the command as `python -m nearstore.cli` would (the bench starts
    # programs; it does not import the composition root).
    sys.argv = ["nearstore", *argv[1:]]
    runpy.run_module("nearstore.cli", run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
