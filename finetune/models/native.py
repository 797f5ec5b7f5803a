"""The native transformers form of every registry model: its config, a weightless (meta) instance, its class.

Families whose published checkpoints are already native (Qwen2.5, Llama-2) map their config.json through
AutoConfig; the remote-code families (ChatGLM3, Baichuan2, Qwen-1) map theirs through their converter's
`native_config`, so the estimator counts exactly the parameters the converted checkpoint will have.
Importing this module registers the Baichuan2-13B ALiBi class with the transformers Auto classes.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from finetune.models import baichuan_alibi  # noqa: F401  (registers BaichuanAlibiForCausalLM)
from finetune.models import registry
from finetune.models.registry import ModelSpec


def converter(name: str) -> ModuleType:
    """The converter module a registry family names (finetune.models.convert.<name>)."""
    return importlib.import_module(f"finetune.models.convert.{name}")


@cache
def _original_model_types() -> dict[str, str]:
    """model_type of the ORIGINAL config.json -> family, for every family that needs converting."""
    return {registry.load_config(m.config_file)["model_type"]: fam.name
            for fam in registry.FAMILIES if fam.converter for m in fam.models}


def detect_original_family(config: dict) -> Optional[str]:
    """The family whose converter applies to this config.json (original layout), or None when it is native.

    Baichuan2-7B and -13B are one family (the converter tells them apart by `max_position_embeddings`).
    """
    return _original_model_types().get(config.get("model_type", ""))


def native_config(spec: ModelSpec) -> PretrainedConfig:
    """The native transformers config of a registry model (variant overrides included)."""
    original = spec.original_config
    if spec.family.converter:
        return converter(spec.family.converter).native_config(original)
    return AutoConfig.for_model(**original)


def native_class(config: PretrainedConfig) -> type:
    """The *ForCausalLM class transformers builds for this config (ours included once registered)."""
    return AutoModelForCausalLM._model_mapping[type(config)]


def meta_model(spec: ModelSpec) -> torch.nn.Module:
    """The native model on the meta device: exact parameter counts and shapes, no memory, no download."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(native_config(spec))
