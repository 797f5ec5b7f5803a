"""What every checkpoint converter shares: check an original checkpoint against what its config.json implies, then
stream it tensor by tensor into sharded safetensors in the native layout.

A family module (chatglm3.py, baichuan2.py, qwen1.py) only states facts: `FAMILY`, `native_config(original)`,
`sources(original)` (every original tensor: its shape and the native tensors it becomes) and
`generation(original)` (generation_config.json fields). Everything that touches files lives here, so each family
gets the same validation, the same memory bound (one shard plus one source tensor in RAM, whatever the model size)
and the same all-or-nothing output.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedConfig

from finetune import atomic
from finetune.errors import UserError
from finetune.models import native
from finetune.models.tokenizers import FAMILY_TOKENIZERS, build_tokenizer

SHARD_BYTES = 2 * 2**30
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Source:
    """One tensor of the original checkpoint: the shape its config implies and the native tensors it becomes.

    `init` says how the tiny-model builder fills it ("normal": std 0.02, "ones": a norm, a tensor: that exact
    value, None: left out like the buffers real checkpoints omit); `optional` marks buffers a checkpoint may omit.
    """

    shape: tuple[int, ...]
    to: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    init: Union[str, torch.Tensor, None] = "normal"
    optional: bool = False


def rename(name: str) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    return lambda t: {name: t}


def split_rows(names_sizes: dict[str, int]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Split a fused projection (weight rows or bias) into its parts, in the given order."""
    names, sizes = list(names_sizes), list(names_sizes.values())
    return lambda t: dict(zip(names, t.split(sizes, dim=0)))  # views: ShardWriter copies them out


def drop(_: torch.Tensor) -> dict[str, torch.Tensor]:
    return {}


def norm_head(name: str) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Baichuan2's NormHead as a plain lm_head: rows L2-normalised once, in fp32 and kept fp32 (rounding the
    normalised rows to bf16 changes logits by ~1e-2; fp16 normalisation fails on CPU)."""
    return lambda t: {name: torch.nn.functional.normalize(t.float(), p=2, dim=1, eps=1e-12)}


def need(original: dict, key: str, family: str):
    """A config.json value the conversion cannot do without."""
    if key not in original:
        raise UserError(f"config.json has no '{key}', which every {family} config has: is this a {family} checkpoint?")
    return original[key]


def expect(original: dict, key: str, value, family: str) -> None:
    """A config.json switch the native class hard-codes; refuse rather than convert into a different model."""
    if original.get(key, value) != value:
        raise UserError(f"config.json: {key}={original[key]!r} is not supported for {family} "
                        f"(the native class implements {key}={value!r} only)")


@dataclass(frozen=True)
class Found:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files: the safetensors set if there is one (ChatGLM3 ships both), else the .bin set."""
    for index_name, single, pattern in zip(INDEX_FILES, SINGLE_FILES, ("*.safetensors", "*.bin")):
        index = src / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as err:
                raise UserError(f"{index}: not a weight index ({err})") from None
            missing = [n for n in names if not (src / n).is_file()]
            if missing:
                raise UserError(f"{index} lists {missing[0]}, which is not in {src}: the download is incomplete")
            return [src / n for n in names]
        if (src / single).is_file():
            return [src / single]
        shards = sorted(p for p in src.glob(pattern) if p.name.startswith(("model", "pytorch_model")))
        if shards:
            return shards
    raise UserError(f"{src}: no weights found (expected model*.safetensors or pytorch_model*.bin)")


@contextmanager
def open_weights(path: Path) -> Iterator[dict[str, Callable[[], torch.Tensor]]]:
    """{key: loader} for one weight file, reading nothing until a loader is called (mmap for .bin files)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            yield {k: (lambda k=k: f.get_tensor(k)) for k in f.keys()}
        return
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (non-zip) pickle: cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    yield {k: (lambda v=v: v) for k, v in state.items()}


def scan(files: list[Path]) -> dict[str, Found]:
    """Shape and dtype of every tensor, without loading the data of safetensors files."""
    found: dict[str, Found] = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    found.setdefault(k, Found(path, tuple(sl.get_shape()), _st_dtype(sl.get_dtype())))
        else:
            with open_weights(path) as tensors:
                for k, load in tensors.items():
                    t = load()
                    found.setdefault(k, Found(path, tuple(t.shape), t.dtype))
    return found


def _st_dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}.get(name, torch.float32)


def validate(src: Path, expected: dict[str, Source], found: dict[str, Found], family: str) -> None:
    """Every tensor the config implies is there with its shape, and nothing else: else one clear error."""
    missing = [k for k, s in expected.items() if k not in found and not s.optional]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{src}: tensor '{missing[0]}'{more} is missing, but config.json implies it "
                        f"(shape {list(expected[missing[0]].shape)}): the checkpoint is incomplete, or config.json "
                        f"belongs to another {family} model")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UserError(f"{found[unexpected[0]].file}: unexpected tensor '{unexpected[0]}'{more}: not part of a "
                        f"{family} checkpoint with this config.json")
    for k, f in found.items():
        if f.shape != expected[k].shape:
            raise UserError(f"{f.file}: tensor '{k}' has shape {list(f.shape)}, config.json implies "
                            f"{list(expected[k].shape)}: config.json belongs to another model")


class ShardWriter:
    """Native tensors into model-0000i-of-0000N.safetensors (+ index), holding at most one shard in memory."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and sum(t.numel() * t.element_size() for t in self.buffer.values()) + size > self.shard_bytes:
            self.flush()
        if tensor.untyped_storage().nbytes() != size or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()  # own its storage: safetensors refuses shared or strided tensors
        self.buffer[name] = tensor
        self.total += size

    def flush(self) -> None:
        part = self.out / f".part-{len(self.parts):05d}.safetensors"
        save_file(self.buffer, str(part), metadata={"format": "pt"})
        self.parts.append((part, list(self.buffer)))
        self.buffer = {}

    def finish(self) -> int:
        """Name the shards, write the index when there is more than one; return the number of shards."""
        if self.buffer:
            self.flush()
        n = len(self.parts)
        weight_map = {}
        for i, (part, names) in enumerate(self.parts, 1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            part.rename(self.out / final)
            (self.out / final).chmod(0o644)  # safetensors creates 0600 files; a cache may be shared
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return n


def main_dtype(found: dict[str, Found]) -> torch.dtype:
    """The dtype holding most of the checkpoint's bytes: what the native config declares (Qwen-1 declares none)."""
    size: dict[torch.dtype, int] = {}
    for f in found.values():
        n = 1
        for d in f.shape:
            n *= d
        size[f.dtype] = size.get(f.dtype, 0) + n
    return max(size, key=size.get)


def read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise UserError(f"{src}: no config.json; point at a checkpoint directory (config.json + weights)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def convert(family: ModuleType, src_dir: Path, dst_dir: Path, *, progress: bool = True,
            shard_bytes: int = SHARD_BYTES) -> dict:
    """Convert one original checkpoint with `family`'s facts; `dst_dir` appears complete or not at all."""
    start = time.monotonic()
    src, dst = Path(src_dir), Path(dst_dir)
    original = read_config(src)
    detected = native.detect_original_family(original)
    if detected != family.FAMILY:
        what = f"a {detected} checkpoint" if detected else "already in a native transformers layout"
        raise UserError(f"{src / 'config.json'}: model_type {original.get('model_type')!r} is {what}, "
                        f"not {family.FAMILY}: nothing to convert with the {family.FAMILY} converter")
    try:
        config: PreTrainedConfig = family.native_config(original)
        expected = family.sources(original)
    except UserError as err:
        raise UserError(f"{src / 'config.json'}: {err}") from None
    found = scan(weight_files(src))
    validate(src, expected, found, family.FAMILY)
    tokenizer = build_tokenizer(family.FAMILY, src)  # before the long part: missing files stop us early
    config.dtype = main_dtype(found)
    config.architectures = [native.native_class(config).__name__]
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst} already exists and is not empty; remove it or choose another destination")
    if dst.exists():
        dst.rmdir()

    n_out = 0
    with atomic.directory(dst) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        bar = tqdm(total=len(found), unit="tensor", desc=f"convert {family.FAMILY}", disable=not progress)
        for path in sorted({f.file for f in found.values()}):
            with open_weights(path) as tensors:
                for key, load in tensors.items():
                    if found[key].file != path:
                        continue
                    for name, tensor in expected[key].to(load()).items():
                        writer.add(name, tensor)
                        n_out += 1
                    bar.update(1)
        bar.close()
        shards = writer.finish()
        config.save_pretrained(tmp)
        GenerationConfig(**family.generation(original)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in FAMILY_TOKENIZERS[family.FAMILY].files:  # for tools that read the originals (llama.cpp)
            shutil.copy2(src / name, tmp / name)
    summary = {"family": family.FAMILY, "src": str(src), "dst": str(dst), "native_class": config.architectures[0],
               "dtype": str(config.dtype).removeprefix("torch."), "tensors_in": len(found), "tensors_out": n_out,
               "shards": shards, "bytes": writer.total, "seconds": round(time.monotonic() - start, 2)}
    if progress:
        print(f"converted {src} -> {dst}: {summary['native_class']}, {n_out} tensors in {shards} shard(s), "
              f"{writer.total / 2**30:.2f} GiB {summary['dtype']}, {summary['seconds']} s", file=sys.stderr)
    return summary
