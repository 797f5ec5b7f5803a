"""Tiny random checkpoints of every registry architecture, for tests and the CPU demo.

A tiny model is built from its registry config (configs/tiny_*.json) with the REAL tokenizer of its family, and
saved the way a user's checkpoint would be, so the real loading and conversion paths run:
- layout "original": the remote-code layout of ChatGLM3 / Baichuan2 / Qwen-1 (original key names and shapes,
  original config.json, the original tokenizer files), i.e. what a hub download of the real model looks like;
- layout "native": what the model loads as without remote code (for those three families: the "original" build
  passed through the real converter).
Weights are N(0, 0.02) with norms at 1, so a tiny model's activations and logits stay numerically sane.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from finetune import atomic
from finetune.errors import UserError, did_you_mean
from finetune.models import chat, native, registry, tokenizers
from finetune.models.convert import cache_root, code_hash
from finetune.models.registry import ModelSpec

TOKENIZER_FILES = tokenizers.BUNDLED  # the real tokenizer files of each family (package data)
LAYOUTS = ("native", "original")
STD = 0.02


def _spec(model_name: str, layout: str) -> ModelSpec:
    spec = registry.spec(model_name)
    if not spec.model.tiny:
        tiny = [name for name, (_, m) in registry.models().items() if m.tiny]
        raise UserError(f"{model_name} is not a tiny model; tiny ones: {', '.join(tiny)}")
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout '{layout}'{did_you_mean(layout, LAYOUTS)}; layouts: {', '.join(LAYOUTS)}")
    if layout == "original" and not spec.family.converter:
        raise UserError(f"{model_name}: {spec.family.display} checkpoints are already native; "
                        f"it has only the 'native' layout")
    return spec


def _tokenizer(family: str) -> PreTrainedTokenizerBase:
    """The family's real tokenizer, built once per session from the fixture files and cached by content."""
    return AutoTokenizer.from_pretrained(tokenizers.bundled_tokenizer_dir(family))


def _write_original(spec: ModelSpec, out: Path, seed: int) -> None:
    """Random weights under the original key names, the published-style config.json, the original tokenizer files."""
    original = spec.original_config
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, src in native.converter(spec.family.converter).sources(original).items():
        if isinstance(src.init, torch.Tensor):
            tensors[key] = src.init.clone()
        elif src.init == "ones":
            tensors[key] = torch.ones(src.shape)
        elif src.init == "normal":
            tensors[key] = torch.randn(src.shape, generator=gen) * STD
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(original, indent=2) + "\n")
    for f in sorted((TOKENIZER_FILES / spec.family.name).iterdir()):
        if f.is_file() and f.name != "README.md":
            shutil.copy2(f, out / f.name)


def _write_native(spec: ModelSpec, out: Path, seed: int) -> None:
    """transformers' own initialisation (normal(0, initializer_range), norms at 1), saved with its tokenizer."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(native.native_config(spec))
    tokenizer = _tokenizer(spec.family.name)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(list(spec.family.chat.stop_tokens)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in tokenizers.FAMILY_TOKENIZERS[spec.family.name].files:  # for tools that read the originals
        shutil.copy2(TOKENIZER_FILES / spec.family.name / name, out / name)


def build_tiny(model_name: str, out_dir: Path, *, layout: str = "native", seed: int = 0) -> Path:
    """Build tiny model `model_name` into `out_dir` (which must not exist yet) in the given layout."""
    spec = _spec(model_name, layout)
    out = Path(out_dir)
    if out.exists():
        raise UserError(f"{out} already exists; build_tiny writes a new directory")
    if spec.family.converter and layout == "native":
        with tempfile.TemporaryDirectory(prefix="tiny-original-") as scratch:
            original = build_tiny(model_name, Path(scratch) / "original", layout="original", seed=seed)
            native.converter(spec.family.converter).convert(original, out, progress=False)
        return out
    with atomic.directory(out) as tmp:
        (_write_original if layout == "original" else _write_native)(spec, tmp, seed)
    return out


def _fingerprint(spec: ModelSpec, layout: str) -> str:
    """What a tiny build depends on: its config, our builder/converter code, the tokenizer files."""
    h = hashlib.sha256(json.dumps([spec.original_config, layout], sort_keys=True).encode())
    modules = [__name__, "finetune.models.native", "finetune.models.baichuan_alibi", "finetune.models.convert.common"]
    if spec.family.converter:
        modules.append(f"finetune.models.convert.{spec.family.converter}")
    if layout == "native":  # its tokenizer carries the chat format's HF template
        modules.append("finetune.models.tokenizers")
    h.update(code_hash(*modules).encode())
    for path in chat.SOURCES if layout == "native" else ():
        h.update(path.read_bytes())
    for f in sorted((TOKENIZER_FILES / spec.family.name).iterdir()):
        h.update(f"{f.name}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()[:12]


def cached_tiny(model_name: str, layout: str = "native") -> Path:
    """`build_tiny` once per content: $FINETUNE_CACHE/tiny/<name>-<layout>-<hash>/, appearing complete or not at all."""
    spec = _spec(model_name, layout)
    dst = cache_root() / "tiny" / f"{model_name}-{layout}-{_fingerprint(spec, layout)}"
    return atomic.build_once(dst, lambda path: build_tiny(model_name, path, layout=layout), marker="config.json")
