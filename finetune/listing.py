"""What ships, as rows: `finetune list recipes`, and the table both listings print (tables for people, JSON for
machines). `finetune list models` is the estimator's (finetune.estimate.recommend.models_table), which reads these
recipe rows: the dependency goes one way, estimate -> listing.

The recipe rows are cached (finetune.estimate.cache) keyed by the recipe files' contents and the code that reads
them: composing and validating ~30 recipes with OmegaConf takes seconds, and `finetune recommend` needs them too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.table import Table

from finetune import config, schema, stages
from finetune.estimate import cache


def _description(path: Path) -> str:
    """A recipe's first comment line says what it is for."""
    first = path.read_text(encoding="utf-8").splitlines()[:1]
    return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""


def recipes() -> list[dict[str, Any]]:
    """Every shipped (and $FINETUNE_RECIPES) recipe: name, model, method, stage, description."""
    files = [path for directory in config.recipe_dirs() for path in sorted(directory.rglob("*.y*ml"))]
    entry = cache.key(os.environ.get("FINETUNE_RECIPES"), cache.files_digest(
        [*files, *(Path(m.__file__) for m in (config, schema, stages)), Path(__file__)]))
    rows = cache.load("listing", "recipes", entry)
    if not isinstance(rows, list):
        rows = []
        for name, path in config.shipped_recipes().items():
            recipe = config.load(str(path))
            rows.append({"recipe": name, "model": recipe.model, "method": recipe.method, "stage": recipe.stage,
                         "description": _description(path)})
        cache.store("listing", "recipes", entry, rows)
    return rows


def table(rows: list[dict[str, Any]], title: str) -> Table:
    out = Table(title=title, show_lines=False, header_style="bold")
    for i, column in enumerate(rows[0] if rows else []):
        out.add_column(column.replace("_", " "), no_wrap=i == 0, overflow="fold")
    for row in rows:
        out.add_row(*("" if v is None else str(v) for v in row.values()))
    return out
