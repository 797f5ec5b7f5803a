"""`finetune estimate` / `--dry-run`: the plan against the GPUs, a verdict, and what to change when it won't fit.

`estimate_report` is the machine form (the `--json` object: scripts and tests read params_total,
params_trainable, peak_bytes, breakdown, gpus, fits and suggestions, so those keys stay); `render_estimate` the
table a person reads; `save_breakdown_png` the picture. Every suggestion is a real re-plan of the recipe with one
change (config.with_overrides), so its number is an estimate, not a rule of thumb.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from finetune import atomic, config, precision
from finetune.config import Recipe
from finetune.estimate import gpu as gpus_mod
from finetune.estimate.gpu import GPU, GiB
from finetune.estimate.memory import TERMS, MemoryPlan, plan, term_basis
from finetune.models import gguf_base
from finetune.models.registry import ModelSpec


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GiB:.1f} GiB"


def _candidates(recipe: Recipe, n: int) -> list[tuple[list[str], str]]:
    """One-change fixes, cheapest first (what the change costs in speed, data or quality)."""
    t = recipe.train
    out: list[tuple[list[str], str]] = []
    if t.logits == "full":
        out.append((["train.logits=chunked"], "the same loss, computed in tiles: never all the logits at once"))
    if recipe.method == "qlora" and recipe.quant.upcast:
        out.append((["quant.upcast=false"], "embeddings, lm_head and norms stay 16-bit (as TRL and torchtune)"))
    if not t.gradient_checkpointing:
        out.append((["train.gradient_checkpointing=true"], "recompute activations in backward (~30% slower)"))
    if t.micro_batch > 1:
        out.append(([f"train.micro_batch={t.micro_batch // 2}", f"train.grad_accum={t.grad_accum * 2}"],
                    "same effective batch, more accumulation steps"))
    if t.optimizer in ("adamw_torch", "paged_adamw_32bit", "adafactor"):
        out.append((["train.optimizer=paged_adamw_8bit"], "8-bit optimizer states, paged to CPU under pressure"))
    if t.attn_implementation == "eager":
        out.append((["train.attn_implementation=sdpa"], "memory-efficient attention kernel, no s² matrix"))
    if t.max_length > 256:
        out.append(([f"train.max_length={t.max_length // 2}"], "longer examples are truncated"))
    if recipe.method == "full":
        out.append((["method=lora"], "train adapters instead of every weight"))
    if recipe.method == "lora":
        out.append((["method=qlora"], "4-bit base weights (slightly lower quality, slower)"))
    if recipe.distributed != "zero3_offload":
        out.append((["distributed=zero3_offload"], "DeepSpeed ZeRO-3 with weights and optimizer in CPU RAM (slow)"))
    out.append(([f"num_gpus={2 * n}", "distributed=zero3"], f"shard the model over {2 * n} GPUs with ZeRO-3"))
    return out


def suggestions(recipe: Recipe, spec: ModelSpec, current: MemoryPlan,
                capacity: Optional[int]) -> list[dict[str, Any]]:
    """Changes that lower the peak, each with its new estimate, cheapest first; when no single one fits, the
    cheapest combination that does."""
    found, combined, best = [], [], current.peak_bytes
    for changes, why in _candidates(recipe, current.num_gpus):
        changed = config.with_overrides(recipe, changes)
        new = plan(changed, spec, num_gpus=changed.num_gpus or current.num_gpus)
        if new.peak_bytes < current.peak_bytes:
            found.append({"change": " ".join(changes), "why": why, "peak_bytes": new.peak_bytes,
                          "fits": None if capacity is None else new.peak_bytes <= capacity})
    if capacity is None or any(s["fits"] for s in found):
        return found
    for s in found:  # cheapest first, keep each change that still helps, stop once it fits
        together = config.with_overrides(recipe, [*combined, *s["change"].split()])
        new = plan(together, spec, num_gpus=together.num_gpus or current.num_gpus)
        if new.peak_bytes < best:
            combined, best = [*combined, *s["change"].split()], new.peak_bytes
            if best <= capacity:
                found.append({"change": " ".join(combined), "why": "these changes together",
                              "peak_bytes": best, "fits": True})
                break
    return found


def plain_stack(recipe: Recipe) -> list[str]:
    """The overrides that turn a recipe into what most fine-tuning scripts run: transformers' loss on full fp32
    logits (SFT; other stages score their own way) and peft.prepare_model_for_kbit_training's fp32 upcast."""
    return [*(["train.logits=full"] if recipe.stage == "sft" else []), "quant.upcast=true"]


def compare_report(recipe: Recipe, spec: ModelSpec, num_gpus: int) -> dict[str, Any]:
    """The same recipe planned under the plain stack, term by term: why it fits here and would not elsewhere."""
    changes = plain_stack(recipe)
    plain = plan(config.with_overrides(recipe, changes), spec, num_gpus=num_gpus)
    return {"peak_bytes": plain.peak_bytes, "breakdown": plain.breakdown, "peak_phase": plain.peak_phase,
            "overrides": changes}


def estimate_report(recipe: Recipe, spec: ModelSpec, gpus: list[GPU], *,
                    gpu_mem: Optional[float], compare: bool = False) -> dict[str, Any]:
    """The estimate as one JSON-able dict: the `finetune estimate --json` object (`compare`: + the plain stack)."""
    n = recipe.num_gpus or max(1, len(gpus))
    memory = plan(recipe, spec, num_gpus=n)
    used = gpus[:n]
    if gpu_mem:
        capacity, against = int(gpu_mem * GiB), f"gpu_mem={gpu_mem:g} GiB"
    elif used:
        free = min(used, key=lambda g: g.free_bytes)
        capacity, against = free.free_bytes, f"{free.name} ({free.free_bytes / GiB:.1f} GiB free)"
    else:
        capacity, against = None, None
    fits = None if capacity is None else memory.peak_bytes <= capacity
    if fits is None:
        verdict = (f"no GPU found here ({gpus_mod.why_none()}) and no gpu_mem= given: needs "
                   f"{_gib(memory.peak_bytes)} per GPU")
    elif fits:
        verdict = f"fits: {_gib(memory.peak_bytes)} of {against}, {_gib(capacity - memory.peak_bytes)} to spare"
    else:
        verdict = f"does not fit: needs {_gib(memory.peak_bytes)} per GPU, {against}"
    report = {
        "model": spec.name, "variant": spec.variant.name, "method": recipe.method, "stage": recipe.stage,
        "precision": recipe.train.precision, "precision_why": precision.why(recipe.train.precision),
        "micro_batch": recipe.train.micro_batch,
        "max_length": recipe.train.max_length, "num_gpus": memory.num_gpus, "distributed": memory.distributed,
        "params_total": memory.params_total, "params_trainable": memory.params_trainable,
        "peak_bytes": memory.peak_bytes, "peak_phase": memory.peak_phase, "breakdown": memory.breakdown,
        "phases": {name: sum(parts.values()) for name, parts in memory.phases.items()},
        "phase_breakdown": memory.phases,
        "gpus": [{"name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes} for g in gpus],
        "capacity_bytes": capacity, "against": against, "fits": fits,
        "headroom_bytes": None if capacity is None else capacity - memory.peak_bytes, "verdict": verdict,
        "fits_on": gpus_mod.fits_on(memory.peak_bytes),
        "suggestions": [] if fits else suggestions(recipe, spec, memory, capacity),
        "logits": recipe.train.logits, "upcast": recipe.method == "qlora" and recipe.quant.upcast,
        "basis": term_basis(recipe), "stage_terms": memory.stage_terms,
        "base_note": gguf_base.note_for(recipe.model),
    }
    if compare:
        report["compare"] = compare_report(recipe, spec, n)
    return report


def render_estimate(report: dict[str, Any]) -> RenderableType:
    """The estimate for a person: breakdown, GPUs, verdict, and ranked suggestions with their new estimates."""
    title = (f"[bold]{report['model']}[/] ({report['variant']}) · {report['method']} · {report['precision']} · "
             f"micro_batch {report['micro_batch']} × {report['max_length']} tokens · "
             f"{report['num_gpus']} GPU{'s' if report['num_gpus'] > 1 else ''}"
             + (f" ({report['distributed']})" if report["distributed"] != "none" else ""))
    phases = "  ".join(f"{name} {total / GiB:.1f}" for name, total in report["phases"].items())
    parts: list[RenderableType] = [
        Text.from_markup(title),
        Text(f"parameters {report['params_total']:,} · trainable {report['params_trainable']:,}"),
        Text(f"precision {report['precision_why']}", style="dim"),
        *([Text(report["base_note"], style="yellow")] if report.get("base_note") else []),
        _breakdown_table(report),
        Text(f"moments of a step (GiB): {phases} — the peak is {report['peak_phase']}", style="dim"),
        _stage_line(report),
        gpus_mod.format_gpus([GPU(i, g["name"], g["total_bytes"], g["free_bytes"])
                              for i, g in enumerate(report["gpus"])]),
        Text(report["verdict"], style={True: "bold green", False: "bold red", None: "bold yellow"}[report["fits"]]),
    ]
    if "compare" in report:
        parts.append(_compare_line(report))
    if report["fits_on"]:
        parts.append(Text(f"fits on: {', '.join(report['fits_on'])}"))
    if report["suggestions"]:
        fixes = Table(title="what to change (cheapest first)", header_style="bold", show_edge=False)
        for column in ("change", "new peak", "fits", "cost"):
            fixes.add_column(column)
        for s in report["suggestions"]:
            fixes.add_row(s["change"], _gib(s["peak_bytes"]), {True: "yes", False: "no", None: "?"}[s["fits"]],
                          s["why"])
        parts.append(fixes)
    return Group(*parts)


STAGE_TERM_NAMES = {"sequences_per_micro_batch": "sequences per micro-batch",
                    "reference_copy_bytes": "reference model copy (in weights)",
                    "value_head_params": "value head parameters", "generation_bytes": "generation buffers"}


def _stage_line(report: dict[str, Any]) -> Text:
    """stage=X's own terms (estimate/stages.py): sequences per step, a reference copy, a value head, GRPO's
    generation buffers."""
    terms = [f"{STAGE_TERM_NAMES[k]} {_gib(v) if k.endswith('_bytes') else f'{v:,}'}"
             for k, v in report["stage_terms"].items()]
    return Text(f"stage={report['stage']}: {'; '.join(terms)}", style="dim")


def _breakdown_table(report: dict[str, Any]) -> Table:
    """One row per term: ours, the plain stack's (when compared), and what the figure rests on."""
    compare = report.get("compare")
    ours = f"ours ({report['logits']} logits{', fp32 upcast' if report['upcast'] else ''})"
    table = Table(title="peak, per GPU (GiB)", header_style="bold", show_edge=False)
    for column in ("term", ours if compare else "GiB", *(["plain stack"] if compare else []), "basis"):
        table.add_column(column, justify="left" if column in ("term", "basis") else "right")
    for term in TERMS:
        theirs = [f"{compare['breakdown'].get(term, 0) / GiB:.2f}"] if compare else []
        table.add_row(term.replace("_", " "), f"{report['breakdown'].get(term, 0) / GiB:.2f}", *theirs,
                      Text(report["basis"][term], style="dim"))
    theirs = [Text(f"{compare['peak_bytes'] / GiB:.2f}", style="bold")] if compare else []
    table.add_row(Text("peak", style="bold"), Text(f"{report['peak_bytes'] / GiB:.2f}", style="bold"), *theirs, "")
    return table


def _compare_line(report: dict[str, Any]) -> Text:
    compare = report["compare"]
    more = compare["peak_bytes"] - report["peak_bytes"]
    how = [*(["transformers' loss on fp32 logits"] if "train.logits=full" in compare["overrides"] else []),
           *(["peft.prepare_model_for_kbit_training"] if report["method"] == "qlora" else [])]
    detail = f" ({', '.join(how)})" if how else ""
    return Text(f"plain stack = this recipe with {' '.join(compare['overrides'])}{detail}, as most scripts run it: "
                f"{_gib(compare['peak_bytes'])}, {'+' if more >= 0 else '-'}{_gib(abs(more))} against ours")


def save_breakdown_png(report: dict[str, Any], path: Path) -> None:
    """A stacked bar per moment of the step (terms stacked), with the GPU's capacity as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = report["phase_breakdown"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottoms = [0.0] * len(phases)
    for term in TERMS:
        heights = [parts.get(term, 0) / GiB for parts in phases.values()]
        ax.bar(list(phases), heights, bottom=bottoms, label=term.replace("_", " "))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    if report["capacity_bytes"]:
        ax.axhline(report["capacity_bytes"] / GiB, color="red", linestyle="--", label=report["against"])
    ax.set_ylabel("GiB per GPU")
    ax.set_title(f"{report['model']} · {report['method']} · peak {report['peak_bytes'] / GiB:.1f} GiB")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic.write_figure(Path(path), fig, dpi=120)
