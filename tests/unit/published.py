"""One harness for the converter tests: a tiny ORIGINAL checkpoint published the way each family ships it, then
converted with our converter and loaded as the native class — built once per test session for every family."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from finetune.models import registry
from finetune.models.convert import baichuan2, chatglm3, common, qwen1
from finetune.models.tiny import build_tiny
from reference_models import baichuan2_logits, chatglm3_logits, qwen1_logits, republish


@dataclass(frozen=True)
class Published:
    """How a family's hub repo ships its weights, and the independent reference forward to compare against."""

    converter: ModuleType
    reference: Callable[[dict, dict, torch.Tensor], torch.Tensor]
    dtype: torch.dtype
    fmt: str
    shards: int
    shard_bytes: Optional[int] = None  # force several output shards (ChatGLM3's test checks the index)


PUBLISHED = {
    "tiny_chatglm3": Published(chatglm3, chatglm3_logits, torch.float16, "bin", 2, shard_bytes=4 * 2**20),
    "tiny_baichuan2_7b": Published(baichuan2, baichuan2_logits, torch.bfloat16, "bin", 1),
    "tiny_baichuan2_13b": Published(baichuan2, baichuan2_logits, torch.bfloat16, "bin", 3),
    "tiny_qwen1": Published(qwen1, qwen1_logits, torch.bfloat16, "safetensors", 2),
}


@dataclass(frozen=True)
class Converted:
    name: str
    config: dict  # the original config.json
    original: Path
    native: Path
    state: dict[str, torch.Tensor]  # the published weights in float32, for the reference forward
    model: torch.nn.Module  # the native checkpoint loaded in float32, eval mode
    summary: dict

    def reference(self, ids: torch.Tensor) -> torch.Tensor:
        return PUBLISHED[self.name].reference(self.state, self.config, ids)


def publish_and_convert(name: str, root: Path) -> Converted:
    how, config = PUBLISHED[name], registry.spec(name).original_config
    original = build_tiny(name, root / "original", layout="original")
    state = republish(original, how.converter.sources(config), dtype=how.dtype, fmt=how.fmt, shards=how.shards)
    extra = {"shard_bytes": how.shard_bytes} if how.shard_bytes else {}
    summary = common.convert(how.converter, original, root / "native", progress=False, **extra)
    model = AutoModelForCausalLM.from_pretrained(root / "native", dtype=torch.float32).eval()
    return Converted(name, config, original, root / "native", {k: v.float() for k, v in state.items()}, model,
                     summary)


def with_defect(original: Path, out: Path, edit: Callable[[dict], dict], config: Optional[dict] = None) -> Path:
    """A copy of an original checkpoint with one defect, its weights rewritten as one model.safetensors."""
    shutil.copytree(original, out, ignore=shutil.ignore_patterns("pytorch_model*", "model*.safetensors*"))
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(original.glob("pytorch_model*.bin")):
        state |= torch.load(shard, weights_only=True)
    for shard in sorted(original.glob("model*.safetensors")):
        state |= load_file(shard)
    save_file(edit(state), str(out / "model.safetensors"))
    if config is not None:
        (out / "config.json").write_text(json.dumps(config))
    return out
