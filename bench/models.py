"""Model cold starts: load a safetensors checkpoint through nearstore.

    python -m nearstore.bench.models [--size 4GiB] [--files 4] [--quick] [--runs 3] [--keep]

Generates (once, deterministically) a sharded safetensors checkpoint of
``--size`` bytes in ``--files`` files: a decoder-only model (hidden 2048,
MLP 5632, grouped-query attention) in bf16, with an fp16 head and fp32
norms, a few hundred tensors; plus a LoRA adapter of about 32 MiB (one
file). Then it times, over ``--runs`` runs each, median (min-max):

  (a) nearstore warm: ``clients.safetensors.load_torch`` through a nearstore node
      with its chunk cache (bench/peers.py: nearstore-cache+seaweedfs)
      in front of SeaweedFS, every chunk already cached;
  (b) nearstore cold: the same after the node is restarted with an empty
      cache (its chunks come from SeaweedFS);
  (c) local disk: the safetensors package's own loaders on the same files:
      ``safetensors.torch.load_file`` (``safe_open`` + ``get_tensor`` of
      every tensor; the tensors are backed by an mmap of the file, so every
      page is then touched, once, to count the bytes as loaded): the limit,
      no copy at all; the file read into memory then ``safetensors.torch.load``;
      and one ``readinto`` per file into one buffer with the tensors as views
      (what the nearstore loader does, less HTTP: the same single copy);
  (d) boto3: plain ``get_object(...)["Body"].read()`` of each file in turn,
      from the warm node (the naive baseline);
  (e) the LoRA adapter, warm through the node and from local disk, in ms.

Target (issue 14), printed met / not met at the end: (a) warm, mapped, at
least 0.9 x (c)'s safetensors mmap loader, in GB/s (MODELS_WARM_VS_MMAP).

The client runs on the node's machine, so reads take the node's
short-circuit socket (``clients.local``: chunk file descriptors): whole
files are mapped from the chunk files (``LocalNode.map``, copy-on-write,
like the local mmap loader); one row of (a) reads them into memory instead
(``reader=clients.ranged.read_into``: ``preadv``, one copy), one turns the
socket off (NEARSTORE_LOCAL_READS=0) to show plain HTTP over loopback, as
from a node on another machine.

(a) and (e) also run ``load_into``: the same reads into tensors that exist
already (a model's parameters, an adapter swapped in and out), where no
fresh memory has to be faulted in: on this machine that, not the copy, is
most of a warm load's CPU.

The page cache cannot be dropped here (that needs root): the local files,
SeaweedFS's volumes and the cache node's chunk files are all read from
memory once written, so (a) and (c) compare the HTTP path with the page
cache, not with a disk. Memory is touched once before timing (first touches
of fresh memory are slow on this virtual machine and would fall on the
first case measured). Generated data is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nearstore.bench.config import parse_size
from nearstore.bench.peers import CacheSeaweedPeer, PeerContext
from nearstore.bench.stats import Stat, summarize
from nearstore.bench.verdicts import RatioTarget, ratio_table

GiB = 1 << 30
MiB = 1 << 20
BUCKET = "models"
HIDDEN, MLP, KV, VOCAB = 2048, 5632, 256, 32000
LORA_BYTES = 32 * MiB

# ------------------------------------------------------------- the checkpoint


def fmt_size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


@dataclass
class Tensor:
    name: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * {"BF16": 2, "F16": 2, "F32": 4}[self.dtype]


def model_tensors(size: int) -> list[Tensor]:
    """A decoder-only model of about ``size`` bytes: embeddings, N layers, head."""
    layer = [
        ("self_attn.q_proj.weight", "BF16", (HIDDEN, HIDDEN)),
        ("self_attn.k_proj.weight", "BF16", (KV, HIDDEN)),
        ("self_attn.v_proj.weight", "BF16", (KV, HIDDEN)),
        ("self_attn.o_proj.weight", "BF16", (HIDDEN, HIDDEN)),
        ("mlp.gate_proj.weight", "BF16", (MLP, HIDDEN)),
        ("mlp.up_proj.weight", "BF16", (MLP, HIDDEN)),
        ("mlp.down_proj.weight", "BF16", (HIDDEN, MLP)),
        ("input_layernorm.weight", "F32", (HIDDEN,)),
        ("post_attention_layernorm.weight", "F32", (HIDDEN,)),
    ]
    per_layer = sum(Tensor("", d, s).nbytes for _, d, s in layer)
    ends = [Tensor("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN)),
            Tensor("model.norm.weight", "F32", (HIDDEN,)),
            Tensor("lm_head.weight", "F16", (VOCAB, HIDDEN))]  # fmt: skip
    n_layers = max(1, round((size - sum(t.nbytes for t in ends)) / per_layer))
    out = [ends[0]]
    for i in range(n_layers):
        out += [Tensor(f"model.layers.{i}.{n}", d, s) for n, d, s in layer]
    return [*out, *ends[1:]]


def lora_tensors(n_layers: int, size: int = LORA_BYTES) -> list[Tensor]:
    """A LoRA adapter on every projection of ``n_layers`` layers, bf16, its
    rank chosen to come to about ``size`` bytes."""
    mods = [("self_attn.q_proj", HIDDEN, HIDDEN), ("self_attn.k_proj", HIDDEN, KV),
            ("self_attn.v_proj", HIDDEN, KV), ("self_attn.o_proj", HIDDEN, HIDDEN),
            ("mlp.gate_proj", HIDDEN, MLP), ("mlp.up_proj", HIDDEN, MLP),
            ("mlp.down_proj", MLP, HIDDEN)]  # fmt: skip
    per_rank = 2 * n_layers * sum(i + o for _, i, o in mods)
    rank = max(1, round(size / per_rank))
    out = []
    for layer in range(n_layers):
        for m, i, o in mods:
            p = f"base_model.model.model.layers.{layer}.{m}"
            out += [Tensor(f"{p}.lora_A.weight", "BF16", (rank, i)),
                    Tensor(f"{p}.lora_B.weight", "BF16", (o, rank))]  # fmt: skip
    return out


def write_safetensors(path: Path, tensors: list[Tensor], rng: np.random.Generator) -> None:
    """A valid safetensors file (data 8-aligned, as the package writes it)
    of random tensor bytes, written tensor by tensor."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [off, off + t.nbytes]}  # fmt: skip
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors:
            f.write(rng.bytes(t.nbytes))
    tmp.rename(path)


@dataclass
class Dataset:
    dir: Path
    files: list[str]  # shard names, in order
    lora: str
    n_tensors: int
    n_layers: int
    size: int = 0  # bytes of the shards

    def paths(self) -> list[Path]:
        return [self.dir / f for f in self.files]


def generate(data_dir: Path, size: int, n_files: int) -> Dataset:
    """The checkpoint and adapter, written once per (size, files) and reused."""
    tensors = model_tensors(size)
    n_layers = sum(1 for t in tensors if t.name.endswith("q_proj.weight"))
    shards: list[list[Tensor]] = [[] for _ in range(n_files)]
    total = sum(t.nbytes for t in tensors)
    acc = 0
    for t in tensors:  # contiguous runs of about total / n_files bytes
        shards[min(n_files - 1, acc * n_files // total)].append(t)
        acc += t.nbytes
    shards = [s for s in shards if s]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    ds = Dataset(data_dir, names, "adapter_model.safetensors", len(tensors), n_layers, total)
    stamp = data_dir / "manifest.json"
    want = {"size": size, "files": n_files, "version": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return ds
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    t0 = time.monotonic()
    for i, (name, shard) in enumerate(zip(names, shards, strict=True)):
        write_safetensors(data_dir / name, shard, np.random.default_rng(i))
    write_safetensors(data_dir / ds.lora, lora_tensors(n_layers), np.random.default_rng(99))
    index = {"metadata": {"total_size": total},
             "weight_map": {t.name: names[i] for i, s in enumerate(shards) for t in s}}
    (data_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    stamp.write_text(json.dumps(want))
    print(f"generated {fmt_size(total)} in {len(shards)} files, {len(tensors)} tensors "
          f"({time.monotonic() - t0:.1f} s)", flush=True)  # fmt: skip
    return ds


# ------------------------------------------------------------------ timing


@dataclass
class Case:
    name: str
    nbytes: int
    seconds: list[float] = field(default_factory=list)

    def stat(self) -> Stat | None:
        return summarize(self.seconds)


def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    del result
    gc.collect()
    return dt


def touch(loaded: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Read one byte of every 4 KiB page of every tensor: an mmap-backed
    tensor (safetensors' own loader) is only loaded once its pages are in;
    for tensors in memory already this costs next to nothing."""
    for d in loaded if isinstance(loaded, list) else [loaded]:
        for t in d.values():
            if t.numel():
                t.reshape(-1).view(torch.uint8)[::4096].sum()


def local_load_file(ds: Dataset) -> Callable[[], Any]:
    """safetensors.torch.load_file (safe_open + get_tensor of every tensor:
    tensors backed by an mmap of the file), every page then touched."""
    from safetensors.torch import load_file

    def run() -> list[dict[str, Any]]:
        out = [load_file(str(p)) for p in ds.paths()]
        touch(out)
        return out

    return run


def local_read_load(ds: Dataset) -> Callable[[], Any]:
    """The file read into memory, then safetensors.torch.load (tensors copied
    out of the bytes): the whole-read way."""
    from safetensors.torch import load

    return lambda: [load(p.read_bytes()) for p in ds.paths()]


def local_one_read(ds: Dataset) -> Callable[[], Any]:
    """Each file read into one buffer with a single readinto, tensors as
    views of it: what clients.safetensors does, from a local file (the
    same one copy, page cache to memory, without HTTP)."""
    from nearstore.clients.safetensors import DTYPES, parse_header

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in ds.paths():
            with open(p, "rb", buffering=0) as f:
                buf = np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8)
                f.readinto(memoryview(buf.data))
            n = int.from_bytes(buf[:8].tobytes(), "little")
            tensors, _ = parse_header(buf[8 : 8 + n].tobytes(), len(buf))
            base = torch.from_numpy(buf)
            for t in tensors.values():
                dt = getattr(torch, DTYPES[t.dtype][2])
                out[t.name] = base[t.begin : t.end].view(dt).reshape(t.shape)
        return out

    return run


def check_equal(loaded: dict[str, Any], ds: Dataset, lora: bool = False) -> None:
    """Every loaded tensor's bytes against the local file's."""
    from nearstore.clients.safetensors import parse_header

    paths = [ds.dir / ds.lora] if lora else ds.paths()
    n = 0
    for p in paths:
        mm = np.memmap(p, dtype=np.uint8, mode="r")
        hlen = int.from_bytes(mm[:8].tobytes(), "little")
        tensors, _ = parse_header(mm[8 : 8 + hlen].tobytes(), len(mm))
        for t in tensors.values():
            got = loaded[t.name].reshape(-1).view(torch.uint8).numpy()
            if not np.array_equal(got, mm[t.begin : t.end]):
                raise SystemExit(f"MISMATCH: {t.name} in {p.name}")
            n += 1
        del mm
    if n != len(loaded):
        raise SystemExit(f"MISMATCH: {len(loaded)} tensors loaded, {n} in the files")


# ------------------------------------------------------------------- report


def _f(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def fmt(s: Stat | None, scale: float = 1.0, invert: float | None = None) -> str:
    if s is None:
        return "-"
    if invert is not None:  # GB/s from seconds: min time is max rate
        return f"{_f(invert / s.median)} ({_f(invert / s.max)}-{_f(invert / s.min)})"
    return f"{_f(s.median * scale)} ({_f(s.min * scale)}-{_f(s.max * scale)})"


def _ratio(ref: Case, c: Case) -> str:
    r, x = ref.stat(), c.stat()
    return f"{r.median / x.median:.2f}" if r is not None and x is not None else "-"


# Issue 14: a warm load through the node at least 0.9 x safetensors' own
# mmap loader on the local files (GB/s of the medians).
MODELS_WARM_VS_MMAP = 0.9


def gbps(c: Case) -> float | None:
    s = c.stat()
    return c.nbytes / s.median / 1e9 if s is not None and s.median > 0 else None


def warm_target(warm: Case, mmap: Case) -> RatioTarget:
    return RatioTarget("safetensors warm >= 0.9 x the mmap loader", "nearstore warm (mapped)",
                       "local disk load_file (mmap)", MODELS_WARM_VS_MMAP, gbps(warm), gbps(mmap))


def table(cases: list[Case], limit: Case, one_read: Case) -> str:
    rows = ["| case | seconds | GB/s | / local disk (limit) | / local one read |",
            "|---|---|---|---|---|"]  # fmt: skip
    for c in cases:
        s = c.stat()
        rows.append(f"| {c.name} | {fmt(s)} | {fmt(s, invert=c.nbytes / 1e9)} | "
                    f"{_ratio(limit, c)} | {_ratio(one_read, c)} |")  # fmt: skip
    return "\n".join(rows)


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nearstore.bench.models", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=4 * GiB,
                   help="checkpoint size (4GiB; at least one layer: about 330 MiB)")
    p.add_argument("--files", type=int, default=4, help="shards (4)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per case (3)")
    p.add_argument("--streams", type=int, default=16, help="concurrent ranged GETs (16)")
    p.add_argument("--quick", action="store_true", help="1 GiB in 2 files")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--data-dir", type=Path, help="where the data is generated "
                   "(default: <tmp>/nearstore-bench-models)")  # fmt: skip
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures to FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.files = min(args.size, GiB), min(args.files, 2)
    data_dir = args.data_dir or Path(tempfile.gettempdir()) / "nearstore-bench-models"
    started = time.monotonic()
    from nearstore.clients import checkpoint, ranged
    from nearstore.clients import safetensors as nst
    from nearstore.clients.connect import connect

    ds = generate(data_dir / f"{args.size}-{args.files}", args.size, args.files)
    lora_size = (ds.dir / ds.lora).stat().st_size
    print(f"checkpoint: {fmt_size(ds.size)} in {len(ds.files)} files, {ds.n_tensors} tensors, "
          f"{ds.n_layers} layers; LoRA adapter {fmt_size(lora_size)}", flush=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="nearstore-bench-models-"))
    peer = CacheSeaweedPeer(PeerContext(work, ds.dir, BUCKET, Path(sys.executable).parent))
    peer.cache_size = f"{max(8 * GiB, 2 * (ds.size + lora_size)) // MiB}MiB"
    why = peer.unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    cases: list[Case] = []
    try:
        peer.start()
        admin = peer.backing.client()
        admin.create_bucket(Bucket=BUCKET)
        s3 = connect(peer.endpoint(), access_key=peer.access_key, secret_key=peer.secret_key)
        keys = [f"llm/{f}" for f in ds.files]
        t0 = time.perf_counter()
        for f in [*ds.files, ds.lora, "model.safetensors.index.json"]:
            checkpoint.save(s3, BUCKET, f"llm/{f}", ds.dir / f)
        up = time.perf_counter() - t0
        print(f"uploaded through the node to SeaweedFS (clients.checkpoint.save): "
              f"{up:.1f} s, {(ds.size + lora_size) / up / 1e9:.2f} GB/s", flush=True)  # fmt: skip
        index = "llm/model.safetensors.index.json"

        def ns_load() -> Any:
            out = nst.load_torch(s3, BUCKET, index, streams=args.streams)
            touch(out)  # as for the local loader; nothing to fault in here
            return out

        # Touch the memory the loads will use once, off the clock.
        np.ones(ds.size + GiB, dtype=np.uint8)
        gc.collect()

        cold = Case("(b) nearstore cold: cache empty, chunks from SeaweedFS", ds.size)
        for _ in range(args.runs):
            peer.clear_cache()
            cold.seconds.append(timed(ns_load))
        warm = Case("(a) nearstore warm: every chunk in the cache (mapped)", ds.size)
        check_equal(ns_load(), ds)
        for _ in range(args.runs):
            warm.seconds.append(timed(ns_load))
        # Read into memory through the socket (preadv), not mapped.
        def ns_read() -> Any:
            out = nst.load_torch(s3, BUCKET, index, streams=args.streams, reader=ranged.read_into)
            touch(out)
            return out

        copied = Case("(a) nearstore warm, read into memory (socket + preadv, not mapped)", ds.size)
        for _ in range(args.runs):
            copied.seconds.append(timed(ns_read))
        # The same over HTTP only, as from a node on another machine.
        http_only = Case("(a) nearstore warm, HTTP only (no short-circuit socket)", ds.size)
        os.environ["NEARSTORE_LOCAL_READS"] = "0"
        try:
            for _ in range(args.runs):
                http_only.seconds.append(timed(ns_load))
        finally:
            del os.environ["NEARSTORE_LOCAL_READS"]
        # The same into tensors that exist already (allocated and loaded once
        # before): no fresh memory to fault in.
        dest = {k: torch.empty_like(v) for k, v in ns_load().items()}
        nst.load_into(s3, BUCKET, index, dest, streams=args.streams)
        check_equal(dest, ds)
        in_place = Case("(a) nearstore warm, load_into tensors allocated once", ds.size)
        for _ in range(args.runs):
            in_place.seconds.append(timed(
                lambda: nst.load_into(s3, BUCKET, index, dest, streams=args.streams)))
        dest.clear()
        local = Case("(c) local disk, safetensors.torch.load_file (mmap), pages touched",
                     ds.size)  # fmt: skip
        package_read = Case("(c) local disk, read_bytes + safetensors.torch.load", ds.size)
        one_read = Case("(c) local disk, one readinto per file, tensors as views", ds.size)
        for _ in range(args.runs):
            local.seconds.append(timed(local_load_file(ds)))
            package_read.seconds.append(timed(local_read_load(ds)))
            one_read.seconds.append(timed(local_one_read(ds)))
        naive = Case("(d) boto3 get_object().read(), file by file, warm node", ds.size)
        for _ in range(args.runs):
            naive.seconds.append(timed(
                lambda: [s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys]))
        cases = [warm, copied, in_place, http_only, cold, local, package_read, one_read, naive]

        lora_key = f"llm/{ds.lora}"
        check_equal(nst.load_torch(s3, BUCKET, lora_key), ds, lora=True)
        lora = Case("(e) LoRA adapter warm through the node, load_torch", lora_size)
        swap = Case("(e) LoRA adapter warm through the node, load_into (hot swap)", lora_size)
        lora_local = Case("(e) LoRA adapter, local disk, load_file + touch", lora_size)
        from safetensors.torch import load_file

        adapter = nst.load_torch(s3, BUCKET, lora_key)
        for _ in range(max(args.runs, 10)):
            lora.seconds.append(timed(
                lambda: touch(nst.load_torch(s3, BUCKET, lora_key, streams=args.streams))))
            swap.seconds.append(timed(
                lambda: nst.load_into(s3, BUCKET, lora_key, adapter, streams=args.streams)))
            lora_local.seconds.append(timed(lambda: touch(load_file(str(ds.dir / ds.lora)))))
    finally:
        peer.stop()
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(ds.dir, ignore_errors=True)

    print()
    print(f"nearstore bench.models: {fmt_size(ds.size)} safetensors checkpoint, "
          f"{len(ds.files)} files, {ds.n_tensors} tensors; {args.runs} runs, "
          f"median (min-max); {args.streams} streams; took {time.monotonic() - started:.0f} s")
    print()
    print(table(cases, local, one_read))
    print()
    print(f"LoRA adapter ({fmt_size(lora_size)}, {len(lora_tensors(ds.n_layers))} tensors), "
          f"{len(lora.seconds)} runs, ms: load_torch {fmt(lora.stat(), 1000)}, load_into "
          f"(hot swap) {fmt(swap.stat(), 1000)}; local disk load_file + touch "
          f"{fmt(lora_local.stat(), 1000)}")  # fmt: skip
    print(f"\nwarm / local disk: {_ratio(local, warm)} against safetensors' mmap loader "
          f"(no copy at all: the page cache mapped in), {_ratio(one_read, warm)} against one "
          f"read per file into memory (the same single copy, without HTTP).\n"
          f"The page cache is not dropped (needs root): the local files, SeaweedFS's volumes "
          f"and the cache node's chunk files are all read from memory.\n")  # fmt: skip
    print(ratio_table([warm_target(warm, local)], "GB/s"))
    if args.json:
        doc = {c.name: {"bytes": c.nbytes, "seconds": c.seconds}
               for c in [*cases, lora, swap, lora_local]}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
