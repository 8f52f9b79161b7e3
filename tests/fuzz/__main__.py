"""``python -m tests.fuzz [libFuzzer flags] [corpus dirs | crash files]``:
the front-door fuzz target (``tests.fuzz.front_door``) under atheris.

The node's modules (``nearstore.*``) are imported inside atheris's import
hook so that their bytecode reports coverage; the harness's own and the
libraries' are not (their coverage would only slow each input and steer
the fuzzer towards botocore's signer). Without a corpus directory on the
command line the seeds go to a fresh temporary one; with one, fresh seeds
are written into it first (they are signed at start, so they never go
stale).
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["nearstore"]):
    from tests.fuzz import front_door


def main() -> None:
    # The node's store: NEARSTORE_FUZZ_DATA (emptied first; `make fuzz`
    # names build/fuzz/node), else a temporary directory, left behind when
    # libFuzzer exits.
    node = front_door.FuzzNode(reset_every=front_door.RESET_EVERY, data_dir=os.environ.get("NEARSTORE_FUZZ_DATA"))
    args = list(sys.argv)
    for a in args[1:]:
        if not a.startswith("-") and not os.path.exists(a):
            os.makedirs(a)  # a corpus directory to start
    dirs = [a for a in args[1:] if not a.startswith("-") and os.path.isdir(a)]
    files = [a for a in args[1:] if not a.startswith("-") and os.path.isfile(a)]
    if not files:
        if not dirs:
            dirs = [tempfile.mkdtemp(prefix="nearstore-fuzz-corpus-")]
            args.append(dirs[0])
        made = front_door.write_seeds(dirs[0], node.upload_id)
        print(f"front door: {made} fresh seeds in {dirs[0]}; node on 127.0.0.1:{node.port}", file=sys.stderr)

    seen: set[str] = set()

    def test_one_input(data: bytes) -> None:
        try:
            front_door.one_input(node, data)
        finally:
            # Findings already reported are counted, not stopped at: each
            # said when first met, all of them every 20,000 inputs and at a
            # crash (libFuzzer's own exit at the end runs no Python).
            for what in front_door.KNOWN.keys() - seen:
                seen.add(what)
                print(f"front door: known finding met: {what}", file=sys.stderr, flush=True)
            if node.served % 20_000 == 0:
                known()

    def known() -> None:
        for what, n in front_door.KNOWN.items():
            print(f"front door: known finding, {n} inputs: {what}", file=sys.stderr, flush=True)

    atexit.register(known)
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
