"""Peak memory of converting a REAL-shaped original checkpoint (random weights: memory does not depend on values).

    python scripts/bench_convert.py baichuan2_7b [--workdir DIR] [--keep]

Writes the original remote-code layout of the registry model (published key names, shapes, dtype and config, in
~2 GiB safetensors shards with an index), converts it with `finetune convert` in a child process, and prints the
child's peak RSS next to the checkpoint size. The claim under test: conversion streams tensor by tensor, so peak
RSS stays near one shard plus one tensor whatever the model size (a 13B converts within 24 GiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.models import native, registry
from finetune.models.tiny import TOKENIZER_FILES

SHARD_BYTES = 2 * 2**30
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def write_original(name: str, out: Path) -> int:
    """The published layout of `name` with N(0, 0.02) weights in ~2 GiB shards; returns the bytes written."""
    spec = registry.spec(name)
    original = spec.original_config
    dtype = DTYPES[original.get("torch_dtype", "bfloat16")]
    shard: dict[str, torch.Tensor] = {}
    shard_keys: list[list[str]] = []
    total = 0

    def flush() -> None:
        save_file(shard, str(out / f"part-{len(shard_keys) + 1:05d}.safetensors"), metadata={"format": "pt"})
        shard_keys.append(list(shard))
        shard.clear()

    for key, src in native.converter(spec.family.converter).sources(original).items():
        if src.init is None:
            continue
        tensor = src.init.clone() if isinstance(src.init, torch.Tensor) else (
            torch.ones(src.shape, dtype=dtype) if src.init == "ones" else
            torch.empty(src.shape, dtype=dtype).normal_(0.0, 0.02))
        size = tensor.numel() * tensor.element_size()
        if shard and sum(t.numel() * t.element_size() for t in shard.values()) + size > SHARD_BYTES:
            flush()
        shard[key] = tensor
        total += size
    flush()
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shard_keys, 1):
        final = f"model-{i:05d}-of-{len(shard_keys):05d}.safetensors"
        (out / f"part-{i:05d}.safetensors").rename(out / final)
        weight_map |= dict.fromkeys(keys, final)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(original, indent=2))
    for f in (TOKENIZER_FILES / spec.family.name).iterdir():
        if f.name != "README.md":
            shutil.copy2(f, out / f.name)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="baichuan2_7b",
                        choices=[n for n, (f, m) in registry.models().items() if f.converter and not m.tiny])
    parser.add_argument("--workdir", type=Path, default=None, help="where the two checkpoints go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        src, dst = work / "original", work / "native"
        src.mkdir()
        start = time.perf_counter()
        size = write_original(args.model, src)
        print(f"wrote {args.model} original layout: {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s",
              flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "finetune", "convert", str(src), str(dst)], check=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        out_size = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
        print("| model | checkpoint | converted | convert time | peak RSS of the conversion | RSS / checkpoint |")
        print("|---|---|---|---|---|---|")
        print(f"| {args.model} | {size / 2**30:.2f} GiB | {out_size / 2**30:.2f} GiB | {seconds:.0f} s | "
              f"{peak / 2**30:.2f} GiB | {peak / size:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
