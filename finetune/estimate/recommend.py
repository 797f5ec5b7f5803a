"""`finetune recommend` and `finetune list models`: the guides' model-choice rules, made into estimates.

The guides our users learn from say "< 8 GB: QLoRA on 1-3B; 8-16 GB: QLoRA on 3-7B; > 16 GB: 7-13B" and quote
weights-only figures ("QLoRA brings a 7B to 5-6 GB"). Here every shipped model × method is planned at a common
setting (micro_batch 1, DEFAULT_LENGTH tokens, gradient checkpointing, the shipped base recipe of the method,
one GPU), so the ranking says what training really takes on this memory, next to what loading alone takes.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any, Optional

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from finetune import config, listing
from finetune.errors import UserError, did_you_mean
from finetune.estimate.gpu import GiB
from finetune.estimate.memory import plan
from finetune.models import registry
from finetune.models.registry import ModelSpec

DEFAULT_LENGTH = 2048
METHODS = ("full", "lora", "qlora")  # best quality first
TASK_VARIANTS = {"chat": None, "base": "base"}  # None: the model's default (chat / instruct) variant
METHOD_NOTES = {
    "full": "every weight trains: the most faithful, the most memory",
    "lora": "16-bit base frozen, low-rank adapters train",
    "qlora": "4-bit base frozen, adapters train (a little slower, near-LoRA quality)",
}


def _setting(spec: ModelSpec, method: str, length: int = DEFAULT_LENGTH) -> config.Recipe:
    """The common setting for this model: what `config.load(base/<method>, model=..., variant=...)` gives, made
    from one load per method (a load takes ~0.1 s; the base recipes hold nothing that depends on the model)."""
    return dataclasses.replace(_common(method, length), model=spec.name, variant=spec.variant.name)


@cache
def _common(method: str, length: int) -> config.Recipe:
    any_model = next(iter(registry.models()))  # replaced by _setting; a recipe cannot load without one
    return config.load(f"base/{method}", [f"model={any_model}", "distributed=none", "num_gpus=1",
                                          "train.micro_batch=1", f"train.max_length={length}",
                                          "train.gradient_checkpointing=true"])


def _shipped_recipes() -> dict[tuple[str, str], str]:
    """(model, method) -> the shipped SFT recipe's name, so a recommendation can be run as is."""
    found: dict[tuple[str, str], str] = {}
    for row in listing.recipes():
        if row["stage"] == "sft":
            found.setdefault((row["model"], row["method"]), row["recipe"])
    return found


def _candidates(lang: Optional[str], task: Optional[str]) -> list[ModelSpec]:
    if task is not None and task not in TASK_VARIANTS:
        raise UserError(f"task={task} is not one of {', '.join(TASK_VARIANTS)}{did_you_mean(task, TASK_VARIANTS)}")
    wanted = TASK_VARIANTS.get(task or "chat")
    specs = []
    for name, (fam, model) in registry.models().items():
        if model.tiny:
            continue
        variants = {v.name for v in model.variants}
        if lang and lang not in fam.languages and lang not in variants:
            continue  # a variant named after the language (Chinese-LLaMA-2: zh) adapts the model to it
        variant = lang if lang and lang not in fam.languages else wanted if wanted in variants else None
        specs.append(registry.spec(name, variant))
    return specs


def _why(spec: ModelSpec, method: str, peak: int, load: int) -> str:
    variant = f" ({spec.variant.note})" if spec.variant.note else ""
    return (f"{spec.family.display} {spec.model.size}{variant}: {spec.family.strengths}. {METHOD_NOTES[method]}; "
            f"loading takes {load / GiB:.1f} GiB, training {peak / GiB:.1f} GiB at {DEFAULT_LENGTH} tokens. "
            f"{spec.license}, commercial use: {spec.commercial_use}")


def recommend(gpu_mem_gib: float, lang: Optional[str], task: Optional[str]) -> list[dict[str, Any]]:
    """Shipped model × method combinations that fit `gpu_mem_gib` per GPU, best quality first."""
    recipes = _shipped_recipes()
    rows = []
    for spec in _candidates(lang, task):
        for method in METHODS:
            memory = plan(_setting(spec, method), spec, num_gpus=1)
            if memory.peak_bytes > gpu_mem_gib * GiB:
                continue
            load = sum(memory.phases["load"].values())
            rows.append({
                "model": spec.name, "variant": spec.variant.name, "method": method,
                "recipe": recipes.get((spec.name, method)), "params": memory.params_total,
                "peak_bytes": memory.peak_bytes, "load_bytes": load,
                "headroom_bytes": int(gpu_mem_gib * GiB) - memory.peak_bytes,
                "languages": list(spec.family.languages), "license": spec.license,
                "commercial_use": spec.commercial_use, "why": _why(spec, method, memory.peak_bytes, load),
            })
    rows.sort(key=lambda r: (-r["params"], METHODS.index(r["method"])))
    return rows


def render(rows: list[dict[str, Any]], gpu_mem_gib: float) -> RenderableType:
    if not rows:
        return Text(f"nothing shipped fits {gpu_mem_gib:g} GiB at {DEFAULT_LENGTH} tokens, micro_batch 1; "
                    f"try a shorter train.max_length with `finetune estimate`", style="bold yellow")
    table = Table(title=f"fits in {gpu_mem_gib:g} GiB per GPU (micro_batch 1, {DEFAULT_LENGTH} tokens, "
                        f"gradient checkpointing), best first", header_style="bold", show_lines=True)
    for column in ("#", "run it with", "peak", "spare", "why"):
        table.add_column(column, overflow="fold")
    for i, r in enumerate(rows, 1):
        run = f"recipe={r['recipe']}" if r["recipe"] else f"model={r['model']} method={r['method']}"
        if r["variant"] != registry.spec(r["model"]).variant.name:
            run += f" variant={r['variant']}"
        table.add_row(str(i), run, f"{r['peak_bytes'] / GiB:.1f} GiB", f"{r['headroom_bytes'] / GiB:.1f} GiB",
                      r["why"])
    return Group(table)


def models_table() -> list[dict[str, Any]]:
    """`finetune list models`: the registry with the estimator's LoRA and QLoRA peaks at DEFAULT_LENGTH tokens."""
    rows = []
    for name, (fam, model) in registry.models().items():
        if model.tiny:
            continue
        spec = registry.spec(name)
        peaks = {m: plan(_setting(spec, m), spec, num_gpus=1).peak_bytes / GiB for m in ("lora", "qlora")}
        rows.append({
            "model": name, "family": fam.display, "size": model.size, "context": spec.context_length,
            "languages": ",".join(fam.languages), "license": spec.license, "commercial_use": spec.commercial_use,
            "variants": ",".join(v.name for v in model.variants), "hf_id": spec.variant.hf_id,
            "modelscope_id": spec.variant.modelscope_id, f"lora_gib@{DEFAULT_LENGTH}": round(peaks["lora"], 1),
            f"qlora_gib@{DEFAULT_LENGTH}": round(peaks["qlora"], 1),
        })
    return rows
