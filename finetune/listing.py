"""What ships, as rows: `finetune list recipes` and `finetune list models` (tables for people, JSON for machines)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from finetune import config


def _description(path) -> str:
    """A recipe's first comment line says what it is for."""
    first = path.read_text(encoding="utf-8").splitlines()[:1]
    return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""


def recipes() -> list[dict[str, Any]]:
    rows = []
    for name, path in config.shipped_recipes().items():
        recipe = config.load(str(path))
        rows.append({"recipe": name, "model": recipe.model, "method": recipe.method, "stage": recipe.stage,
                     "description": _description(path)})
    return rows


def models() -> list[dict[str, Any]]:
    """The registry with the estimator's predicted peak memory: the guides' comparison table, computed."""
    from finetune.estimate.recommend import models_table

    return models_table()


def table(rows: list[dict[str, Any]], title: str) -> Table:
    out = Table(title=title, show_lines=False, header_style="bold")
    for i, column in enumerate(rows[0] if rows else []):
        out.add_column(column.replace("_", " "), no_wrap=i == 0, overflow="fold")
    for row in rows:
        out.add_row(*("" if v is None else str(v) for v in row.values()))
    return out
