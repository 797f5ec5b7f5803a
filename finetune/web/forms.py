"""The Estimate tab's callbacks: page fields → `key=value` overrides → the CLI's recipe, verdict, chart and YAML.

The fields hold what a recipe holds; only the ones that differ from the chosen recipe become overrides, so the
command shown under the page (and run by the Train tab) reads like one a person would type. Bad input is the CLI's
own UserError, shown as the same one line (`error: ...`), never a traceback.
"""

from __future__ import annotations

import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from finetune import config
from finetune.errors import UserError
from finetune.estimate import gpu, report
from finetune.models import registry
from finetune.web import guard

FIELDS: dict[str, str] = {"model": "model", "variant": "variant", "method": "method", "data": "data.path",
                          "max_length": "train.max_length", "lora_r": "lora.r", "micro_batch": "train.micro_batch",
                          "gpu_mem": "gpu_mem"}
"""Page field → recipe key, in the order the page shows them."""

GiB = 2**30


def recipe_names() -> list[str]:
    return list(config.shipped_recipes())


def model_names() -> list[str]:
    return list(registry.models())


def variant_names(model: Optional[str]) -> list[str]:
    found = registry.models().get(model or "")
    return [v.name for v in found[1].variants] if found else []


def method_names() -> list[str]:
    return [str(c) for c in config.choices("method")]


def fields_of(recipe_name: Optional[str]) -> dict[str, Any]:
    """The fields' values for a shipped recipe (what the page shows when one is chosen)."""
    recipe = config.load(recipe_name) if _shipped(recipe_name) else None
    if recipe is None:
        return {name: None for name in FIELDS}
    from omegaconf import OmegaConf

    node = OmegaConf.structured(recipe)
    return {name: OmegaConf.select(node, key) for name, key in FIELDS.items()}


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def split_extra(extra: Optional[str]) -> tuple[list[str], list[str]]:
    """(key=value items, --flags) typed into the "more settings" box."""
    try:
        items = shlex.split(extra or "")
    except ValueError as exc:
        raise UserError(f"more settings: {exc}") from None
    flags = [i for i in items if i.startswith("--")]
    return [i for i in items if i not in flags], flags


def overrides(recipe_name: Optional[str], values: dict[str, Any], extra: Optional[str] = None) -> list[str]:
    """The `key=value` items that turn the chosen recipe into what the fields say (all set fields when none is
    chosen), then the extra box's items."""
    base = fields_of(recipe_name)
    items = []
    for name, key in FIELDS.items():
        value = values.get(name)
        if value is None or value == "" or (recipe_name and _same(value, base[name])):
            continue
        items.append(f"{key}={_text(value)}")
    return items + split_extra(extra)[0]


def _same(value: Any, current: Any) -> bool:
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            return float(value) == float(current)
        except (TypeError, ValueError):
            return False
    return str(value) == str(current)


def _shipped(recipe_name: Optional[str]) -> Optional[str]:
    """A recipe the page lists, by name: `recipe=` also takes any YAML path, which the page must not read."""
    if recipe_name and recipe_name not in recipe_names():
        raise UserError(f"unknown recipe '{recipe_name}'; choose one from the list")
    return recipe_name or None


def resolve(recipe_name: Optional[str], values: dict[str, Any], extra: Optional[str] = None
            ) -> tuple[config.Recipe, list[str]]:
    """The recipe the CLI would build, and its overrides. Same check as the CLI: a recipe or at least a model;
    and what a page user may set (guard.check_settings)."""
    recipe_name = _shipped(recipe_name)
    items = overrides(recipe_name, values, extra)
    guard.check_settings(items, split_extra(extra)[1])
    if not recipe_name and not any(i.startswith("model=") for i in items):
        raise UserError("no recipe given: add recipe=NAME (`finetune list recipes`) or at least model=NAME")
    return config.load(recipe_name or None, items), items


def command(recipe_name: Optional[str], items: list[str], flags: list[str] = ()) -> list[str]:
    """`finetune ...` argv for these settings (without the program)."""
    return [*([f"recipe={recipe_name}"] if recipe_name else []), *items, *flags]


@dataclass
class EstimateView:
    """What the Estimate tab shows; `error` set means only the one-line message is meaningful."""

    verdict: str = ""
    fits: Optional[bool] = None
    chart: Optional[str] = None  # PNG path
    suggestions: list[list[str]] = field(default_factory=list)  # [change, new peak, fits, cost]
    yaml: str = ""
    yaml_file: Optional[str] = None
    command: str = ""
    error: Optional[str] = None
    report: dict[str, Any] = field(default_factory=dict)


def estimate(recipe_name: Optional[str], values: dict[str, Any], extra: Optional[str] = None,
             workdir: Optional[Path] = None) -> EstimateView:
    """The CLI's `finetune estimate` for the fields: verdict, the estimator's PNG, ranked fixes, the recipe YAML."""
    try:
        recipe, items = resolve(recipe_name, values, extra)
        spec = registry.spec_for_estimate(recipe.model, recipe.variant)
        result = report.estimate_report(recipe, spec, gpu.detect(), gpu_mem=recipe.gpu_mem)
    except UserError as exc:
        message = guard.redact(f"error: {exc}")
        return EstimateView(error=message, verdict=message)
    out = Path(workdir or tempfile.mkdtemp(prefix="finetune-web-"))
    out.mkdir(parents=True, exist_ok=True)
    name = guard.safe_name(recipe.name)
    chart = out / f"{name}-{abs(hash((recipe_name, tuple(items)))) % 10**8}.png"
    report.save_breakdown_png(result, chart)
    text = guard.redact(config.to_yaml(recipe))
    yaml_file = out / f"{name}.yaml"
    yaml_file.write_text(text, encoding="utf-8")
    rows = [[s["change"], f"{s['peak_bytes'] / GiB:.1f} GiB", {True: "yes", False: "no", None: "?"}[s["fits"]],
             s["why"]] for s in result["suggestions"]]
    summary = (f"{result['model']} ({result['variant']}) · {result['method']} · peak {result['peak_bytes'] / GiB:.2f}"
               f" GiB per GPU ({result['peak_phase']}) · trainable {result['params_trainable']:,} of "
               f"{result['params_total']:,} parameters")
    return EstimateView(verdict=f"{result['verdict']}\n\n{summary}", fits=result["fits"], chart=str(chart),
                        suggestions=rows, yaml=text, yaml_file=str(yaml_file),
                        command=guard.redact(shlex.join(["finetune", "estimate", *command(recipe_name, items)])),
                        report=result)
