"""Everything the toolkit knows about a base model, in one place: one entry per family, its models and variants.

The rest of the code asks this registry instead of branching on family names: which native transformers class a
checkpoint becomes, which converter turns the original layout into it, its chat format (finetune.models.chat: layout,
labels, stop tokens, text templates, tools), the LoRA targets, the license, the hub ids. Shipped config.json files
(configs/) make parameter counting download-free. This module imports nothing else from finetune but errors and the
chat formats (which import nothing), so anything may import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from typing import Optional

from finetune import shipped
from finetune.errors import UserError, did_you_mean
from finetune.models import chat
from finetune.models.chat.format import ChatFormat

LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Variant:
    """One published checkpoint of a model: the id on each hub, and config keys that differ from the base config."""

    name: str
    hf_id: str
    modelscope_id: Optional[str]
    config_overrides: dict = field(default_factory=dict)
    gated: bool = False  # the hub asks the user to accept a license before downloading
    note: str = ""


@dataclass(frozen=True)
class Model:
    name: str
    size: str
    config_file: str  # original config.json, as published (configs/<config_file>)
    variants: tuple[Variant, ...]
    native_class: Optional[str] = None  # default: the family's
    license: Optional[str] = None  # default: the family's
    commercial_use: Optional[str] = None  # default: the family's
    tiny: bool = False  # built locally from config (tests, demo); never downloaded
    superseded_by: Optional[str] = None  # the registry model that replaces it (recommended after the current ones)

    @property
    def default_variant(self) -> Variant:
        return self.variants[0]


@dataclass(frozen=True)
class Family:
    name: str
    display: str
    native_class: str  # transformers class a checkpoint becomes (loaded without remote code)
    converter: Optional[str]  # module under finetune.models.convert, None when the original is native
    lora_targets: tuple[str, ...]  # module names in the NATIVE model
    chat: ChatFormat  # its chat format, registered once in finetune.models.chat
    license: str
    commercial_use: str
    languages: tuple[str, ...]
    strengths: str
    models: tuple[Model, ...]

    @property
    def template(self) -> str:
        """The name of the family's chat format, as base.json records it."""
        return self.chat.name


@dataclass(frozen=True)
class ModelSpec:
    """A model as one recipe uses it: family facts + the chosen model and variant."""

    family: Family
    model: Model
    variant: Variant

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def native_class(self) -> str:
        return self.model.native_class or self.family.native_class

    @property
    def license(self) -> str:
        return self.model.license or self.family.license

    @property
    def commercial_use(self) -> str:
        return self.model.commercial_use or self.family.commercial_use

    @property
    def original_config(self) -> dict:
        """The published config.json of this variant (original layout; remote-code keys for converted families)."""
        return {**load_config(self.model.config_file), **self.variant.config_overrides}

    @property
    def context_length(self) -> int:
        cfg = self.original_config
        for key in ("seq_length", "max_position_embeddings", "model_max_length"):
            if key in cfg:
                return int(cfg[key])
        raise KeyError(f"{self.model.config_file}: no context length key")


@cache
def load_config(config_file: str) -> dict:
    return json.loads((shipped.MODEL_CONFIGS / config_file).read_text())


def _v(name: str, hf: str, ms: Optional[str], **kw) -> Variant:
    return Variant(name, hf, ms, **kw)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="chatglm3", display="ChatGLM3", native_class="GlmForCausalLM", converter="chatglm3",
        lora_targets=GLM_TARGETS, chat=chat.get("chatglm3"),
        license="ChatGLM3-6B License", commercial_use="after free registration",
        languages=("zh", "en"), strengths="strong Chinese dialogue, tool calls; 8k context (32k variant)",
        models=(
            Model("chatglm3_6b", "6B", "chatglm3_6b.json", (
                _v("chat", "THUDM/chatglm3-6b", "ZhipuAI/chatglm3-6b"),
                _v("base", "THUDM/chatglm3-6b-base", "ZhipuAI/chatglm3-6b-base"),
                _v("32k", "THUDM/chatglm3-6b-32k", "ZhipuAI/chatglm3-6b-32k",
                   config_overrides={"rope_ratio": 50, "seq_length": 32768}),
            )),
            Model("tiny_chatglm3", "tiny", "tiny_chatglm3.json", (_v("chat", "", None),), tiny=True),
        ),
    ),
    Family(
        name="baichuan2", display="Baichuan2", native_class="LlamaForCausalLM", converter="baichuan2",
        lora_targets=LLAMA_STYLE_TARGETS, chat=chat.get("baichuan2"),
        license="Baichuan 2 Model Community License", commercial_use="after written authorization (apply by email)",
        languages=("zh", "en"), strengths="strong Chinese knowledge and writing; 4k context",
        models=(
            Model("baichuan2_7b", "7B", "baichuan2_7b.json", (
                _v("chat", "baichuan-inc/Baichuan2-7B-Chat", "baichuan-inc/Baichuan2-7B-Chat"),
                _v("base", "baichuan-inc/Baichuan2-7B-Base", "baichuan-inc/Baichuan2-7B-Base"),
            )),
            Model("baichuan2_13b", "13B", "baichuan2_13b.json", (
                _v("chat", "baichuan-inc/Baichuan2-13B-Chat", "baichuan-inc/Baichuan2-13B-Chat"),
                _v("base", "baichuan-inc/Baichuan2-13B-Base", "baichuan-inc/Baichuan2-13B-Base"),
            ), native_class="BaichuanAlibiForCausalLM"),
            Model("tiny_baichuan2_7b", "tiny", "tiny_baichuan2_7b.json", (_v("chat", "", None),), tiny=True),
            Model("tiny_baichuan2_13b", "tiny", "tiny_baichuan2_13b.json", (_v("chat", "", None),),
                  native_class="BaichuanAlibiForCausalLM", tiny=True),
        ),
    ),
    Family(
        name="qwen1", display="Qwen (1)", native_class="Qwen2ForCausalLM", converter="qwen1",
        lora_targets=LLAMA_STYLE_TARGETS, chat=chat.get("qwen1"),
        license="Tongyi Qianwen License", commercial_use="yes; above 100M monthly users apply for a license",
        languages=("zh", "en"), strengths="Chinese and English, code; superseded by Qwen2.5",
        models=(
            Model("qwen1_7b", "7B", "qwen1_7b.json", (
                _v("chat", "Qwen/Qwen-7B-Chat", "qwen/Qwen-7B-Chat"),
                _v("base", "Qwen/Qwen-7B", "qwen/Qwen-7B"),
            ), superseded_by="qwen2_5_7b"),
            Model("tiny_qwen1", "tiny", "tiny_qwen1.json", (_v("chat", "", None),), tiny=True),
        ),
    ),
    Family(
        name="qwen2_5", display="Qwen2.5", native_class="Qwen2ForCausalLM", converter=None,
        lora_targets=LLAMA_STYLE_TARGETS, chat=chat.get("qwen2_5"),
        license="Apache-2.0", commercial_use="yes",
        languages=("zh", "en"), strengths="best all-round Chinese/English quality per GB; 32k context",
        models=(
            Model("qwen2_5_7b", "7B", "qwen2_5_7b.json", (
                _v("instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
                _v("base", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B",
                   config_overrides={"max_position_embeddings": 131072, "eos_token_id": 151643}),
            )),
            Model("qwen2_5_3b", "3B", "qwen2_5_3b.json", (
                _v("instruct", "Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-3B-Instruct"),
                _v("base", "Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-3B", config_overrides={"eos_token_id": 151643}),
            ), license="Qwen Research License", commercial_use="no (research only)"),
            Model("qwen2_5_1_5b", "1.5B", "qwen2_5_1_5b.json", (
                _v("instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
                _v("base", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B", config_overrides={"eos_token_id": 151643}),
            )),
            Model("qwen2_5_0_5b", "0.5B", "qwen2_5_0_5b.json", (
                _v("instruct", "Qwen/Qwen2.5-0.5B-Instruct", "qwen/Qwen2.5-0.5B-Instruct"),
                _v("base", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B", config_overrides={"eos_token_id": 151643}),
                # the same shape and config.json; trained further on code (the demo's model, as a packaged GGUF)
                _v("coder_instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen/Qwen2.5-Coder-0.5B-Instruct",
                   note="Qwen2.5-Coder: further trained on code, still a general zh/en chat model"),
            )),
            Model("tiny_qwen2_5", "tiny", "tiny_qwen2_5.json", (_v("instruct", "", None),), tiny=True),
            # the demo's: weights 10x larger (initializer_range 0.2), so the frozen random lm_head can express a
            # confident answer and the loss visibly falls (at 0.02 its logits span about ±1.3)
            Model("tiny_qwen2_5_demo", "tiny", "tiny_qwen2_5_demo.json", (_v("instruct", "", None),), tiny=True),
        ),
    ),
    Family(
        name="llama2", display="Llama-2", native_class="LlamaForCausalLM", converter=None,
        lora_targets=LLAMA_STYLE_TARGETS, chat=chat.get("llama2"),
        license="Llama 2 Community License", commercial_use="yes; above 700M monthly users ask Meta",
        languages=("en",), strengths="English; for Chinese use the hfl Chinese-LLaMA-2 variant (zh)",
        models=(
            Model("llama2_7b", "7B", "llama2_7b.json", (
                _v("chat", "meta-llama/Llama-2-7b-chat-hf", "modelscope/Llama-2-7b-chat-ms", gated=True),
                _v("base", "meta-llama/Llama-2-7b-hf", "modelscope/Llama-2-7b-ms", gated=True),
                _v("zh", "hfl/chinese-llama-2-7b", "ChineseAlpacaGroup/chinese-llama-2-7b",
                   config_overrides={"vocab_size": 55296},
                   note="Chinese-LLaMA-2: vocabulary enlarged to 55,296 and further pre-trained on Chinese"),
            )),
            Model("llama2_13b", "13B", "llama2_13b.json", (
                _v("chat", "meta-llama/Llama-2-13b-chat-hf", "modelscope/Llama-2-13b-chat-ms", gated=True),
                _v("base", "meta-llama/Llama-2-13b-hf", "modelscope/Llama-2-13b-ms", gated=True),
            )),
            Model("tiny_llama2", "tiny", "tiny_llama2.json", (_v("chat", "", None),), tiny=True),
        ),
    ),
)


def config_shape(config: dict) -> tuple:
    """Hidden size, layers, vocabulary: what tells one model size from another, named alike in every layout we know
    but ChatGLM's original one (num_layers, padded_vocab_size)."""
    return (config.get("hidden_size"), config.get("num_hidden_layers", config.get("num_layers")),
            config.get("vocab_size", config.get("padded_vocab_size")))


@cache
def models() -> dict[str, tuple[Family, Model]]:
    return {m.name: (f, m) for f in FAMILIES for m in f.models}


def family(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise UserError(f"unknown model family '{name}'{did_you_mean(name, [f.name for f in FAMILIES])}")


def spec(name: str, variant: Optional[str] = None) -> ModelSpec:
    """The registry entry for `model=NAME [variant=...]`; one clear error naming the closest names otherwise."""
    if name not in models():
        raise UserError(f"unknown model '{name}'{did_you_mean(name, models())}; `finetune list models` shows "
                        f"the registry, or pass a hub id (org/name) or a local directory")
    fam, model = models()[name]
    if variant is None:
        return ModelSpec(fam, model, model.default_variant)
    for v in model.variants:
        if v.name == variant:
            return ModelSpec(fam, model, v)
    names = [v.name for v in model.variants]
    raise UserError(f"model {name} has no variant '{variant}'{did_you_mean(variant, names)}; "
                    f"its variants: {', '.join(names)}")


def known_spec(name: str, variant: Optional[str] = None) -> Optional[ModelSpec]:
    """A registry name (with `variant`), or a hub id the registry knows; None otherwise. What can be planned from the
    shipped configs, without a download."""
    return spec(name, variant) if name in models() else spec_for_hub_id(name)


def spec_for_estimate(name: str, variant: Optional[str] = None) -> ModelSpec:
    """known_spec, or one clear error: the estimator counts from shipped configs, so it needs no download."""
    known = known_spec(name, variant)
    if known is None:
        raise UserError(f"model {name} is not in the registry, so its memory cannot be estimated before download; "
                        f"use a registry name (`finetune list models`){did_you_mean(name, models())}")
    return known


def spec_for_hub_id(hub_id: str) -> Optional[ModelSpec]:
    """The registry entry a hub id (Hugging Face or ModelScope, any case) belongs to, if any."""
    wanted = hub_id.lower()
    for fam, model in models().values():
        for v in model.variants:
            if wanted in (v.hf_id.lower(), (v.modelscope_id or "").lower()):
                return ModelSpec(fam, model, v)
    return None
