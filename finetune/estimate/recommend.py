"""`finetune recommend` and `finetune list models`: the guides' model-choice rules, made into estimates.

The guides our users learn from say "< 8 GB: QLoRA on 1-3B; 8-16 GB: QLoRA on 3-7B; > 16 GB: 7-13B" and quote
weights-only figures ("QLoRA brings a 7B to 5-6 GB"). Here every model × method is planned on one GPU as it
would run: its shipped recipe where there is one (so a row shows the figure a dry run of that recipe shows), else
the method's base recipe at DEFAULT_LENGTH tokens. The ranking says what training really takes on this memory, next
to what loading alone takes. A model the registry marks superseded is ranked after every current one: it is there
for users who already depend on it, not as a first choice. `list models` compares models at one setting, the base
recipes' (their micro_batch, DEFAULT_LENGTH tokens): the setting of every shipped recipe of a 6-13B model.
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


def _setting(spec: ModelSpec, method: str, recipe: Optional[str] = None) -> config.Recipe:
    """This model × method as planned: the shipped `recipe` (on the spec's variant), else the method's base recipe
    at DEFAULT_LENGTH tokens. One load per recipe (~0.1 s each); the model and variant are set afterwards."""
    return dataclasses.replace(_load(recipe or f"base/{method}"), model=spec.name, variant=spec.variant.name)


@cache
def _load(name: str) -> config.Recipe:
    base = name.startswith("base/")
    any_model = [f"model={next(iter(registry.models()))}"] if base else []  # replaced by _setting
    length = [f"train.max_length={DEFAULT_LENGTH}", "train.gradient_checkpointing=true"] if base else []
    return config.load(name, [*any_model, "distributed=none", "num_gpus=1", *length])


def _shipped_recipes() -> dict[tuple[str, str], str]:
    """(model, method) -> the shipped SFT recipe to run it with: the one named after the method (`<model>_lora`),
    else the first; so a recommendation can be run as is."""
    found: dict[tuple[str, str], str] = {}
    for row in listing.recipes():
        key = (row["model"], row["method"])
        if row["stage"] == "sft" and (key not in found or row["recipe"].endswith(f"_{row['method']}")):
            found[key] = row["recipe"]
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


def _why(spec: ModelSpec, recipe: config.Recipe, peak: int, load: int) -> str:
    variant = f" ({spec.variant.note})" if spec.variant.note else ""
    return (f"{spec.family.display} {spec.model.size}{variant}: {spec.family.strengths}. "
            f"{METHOD_NOTES[recipe.method]}; loading takes {load / GiB:.1f} GiB, training {peak / GiB:.1f} GiB at "
            f"{recipe.train.max_length} tokens × micro_batch {recipe.train.micro_batch}. "
            f"{spec.license}, commercial use: {spec.commercial_use}")


def recommend(gpu_mem_gib: float, lang: Optional[str], task: Optional[str]) -> list[dict[str, Any]]:
    """Shipped model × method combinations that fit `gpu_mem_gib` per GPU, best quality first."""
    recipes = _shipped_recipes()
    rows = []
    for spec in _candidates(lang, task):
        for method in METHODS:
            setting = _setting(spec, method, recipes.get((spec.name, method)))
            memory = plan(setting, spec, num_gpus=1)
            if memory.peak_bytes > gpu_mem_gib * GiB:
                continue
            load = sum(memory.phases["load"].values())
            rows.append({
                "model": spec.name, "variant": spec.variant.name, "method": method,
                "recipe": recipes.get((spec.name, method)), "params": memory.params_total,
                "peak_bytes": memory.peak_bytes, "load_bytes": load,
                "headroom_bytes": int(gpu_mem_gib * GiB) - memory.peak_bytes,
                "languages": list(spec.family.languages), "license": spec.license,
                "commercial_use": spec.commercial_use, "superseded_by": spec.model.superseded_by,
                "max_length": setting.train.max_length, "micro_batch": setting.train.micro_batch,
                "why": _why(spec, setting, memory.peak_bytes, load),
            })
    rows.sort(key=lambda r: (r["superseded_by"] is not None, -r["params"], METHODS.index(r["method"])))
    return rows


def render(rows: list[dict[str, Any]], gpu_mem_gib: float) -> RenderableType:
    if not rows:
        return Text(f"nothing shipped fits {gpu_mem_gib:g} GiB as its recipe runs it; try a shorter "
                    f"train.max_length or train.micro_batch=1 with `finetune estimate`", style="bold yellow")
    table = Table(title=f"fits in {gpu_mem_gib:g} GiB per GPU, each as its recipe runs it (a dry run shows the same "
                        f"peak), best first", header_style="bold", show_lines=True)
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
