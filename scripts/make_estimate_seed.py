"""Regenerate finetune/estimate/seed/: the model facts a new user's first commands need, shipped in the package.

    .venv/bin/python scripts/make_estimate_seed.py

Without it, the first dry-run of each model × settings imports torch, transformers, PEFT and bitsandbytes to count
the model on the meta device (~10 s on 2 cores). This plans, in one process with an empty temporary FINETUNE_CACHE
and no seed, what those commands plan: every shipped recipe in every method on each variant of its model,
`recommend` for every language and task, and `list models`. The entries counted there, with a manifest of the
library versions they were made under, replace the seed directory in one rename (entries no longer needed go).
tests/unit/test_estimate_cache.py says when to run it again: after a change to the counting code, a model config,
a shipped recipe's LoRA / quantization settings or a library version.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from finetune import atomic, config
from finetune.estimate import params, recommend
from finetune.models import registry

TARGET = Path(__file__).resolve().parents[1] / "finetune" / "estimate" / "seed"
MANIFEST = "manifest.json"
"""In the seed: the versions (params.versions()) its entries were made under, and how many there are."""
EVERYTHING_FITS = 1e6
"""gpu_mem (GiB) for `recommend`: every model × method is a row."""


def plan_everything() -> None:
    """Plan what a user's first commands plan; facts missing from the cache (and seed) are counted and stored.

    Each shipped recipe is planned in every method (a dry-run that does not fit re-plans it with another method;
    users switch methods too) on each distinct config among its model's variants (`recommend` prints e.g.
    `recipe=llama2_7b_qlora variant=zh`). The dry-run's other suggestions change nothing the facts depend on."""
    for name in config.shipped_recipes():
        recipe = config.load(name)
        _, model = registry.models()[recipe.model]
        specs = {}
        for variant in model.variants:  # variants of one config share their facts
            spec = registry.spec(recipe.model, variant.name)
            specs.setdefault(json.dumps(spec.original_config, sort_keys=True), spec)
        for method in recommend.METHODS:
            changed = recipe if method == recipe.method else config.with_overrides(recipe, [f"method={method}"])
            for spec in specs.values():
                params.facts(changed, spec)
    languages = {lang for family, model in registry.models().values()
                 for lang in (*family.languages, *(v.name for v in model.variants))}
    for lang in (None, *sorted(languages)):
        for task in (None, *recommend.TASK_VARIANTS):
            recommend.recommend(EVERYTHING_FITS, lang, task)
    recommend.models_table()


def main() -> None:
    if params.SEED != TARGET:
        sys.exit(f"finetune is imported from {params.SEED.parents[1]}, not this checkout: run the checkout's venv")
    os.environ.pop("FINETUNE_RECIPES", None)  # the shipped recipes only
    with tempfile.TemporaryDirectory(prefix="estimate-seed-") as scratch:
        os.environ["FINETUNE_CACHE"] = scratch
        params.SEED = Path(scratch) / "no-seed"  # count everything: never carry forward the seed being replaced
        plan_everything()
        entries = sorted((Path(scratch) / "estimate").glob("*.json"))
        with atomic.directory(TARGET, replace=True) as out:
            for entry in entries:
                shutil.copyfile(entry, out / entry.name)
            atomic.write_json(out / MANIFEST, {"versions": params.versions(), "entries": len(entries)})
    size = sum(path.stat().st_size for path in TARGET.iterdir())
    print(f"{TARGET}: {len(entries)} entries and {MANIFEST}, {size / 1024:.0f} KiB, "
          f"made under {', '.join(params.versions())}")


if __name__ == "__main__":
    main()
