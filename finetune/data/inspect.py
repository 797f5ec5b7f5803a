"""What `finetune data` shows before anyone spends GPU time: counts, why records were dropped or truncated, the
token-length histogram (text and PNG), and the first example exactly as the trainer receives it, trained tokens
highlighted. Everything is computed from the same cached pipeline that training uses, with the model's tokenizer
alone: a registry model's ships in the package, so inspecting data downloads no weights (a 7B model's are 15 GB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from finetune import atomic
from finetune.data import files
from finetune.data.kinds import NAMES, RENDERED
from finetune.data.load import column, sources
from finetune.data.pack import pack, padding_waste
from finetune.data.render import prepare
from finetune.models.chat.labels import IGNORE
from finetune.errors import UserError

HISTOGRAM_BINS = 16


def _stats(lengths: list[int], trained: int) -> dict[str, Any]:
    values = np.asarray(lengths or [0])
    return {"total": int(values.sum()), "trained": int(trained), "min": int(values.min()), "max": int(values.max()),
            "mean": round(float(values.mean()), 1), "p50": int(np.percentile(values, 50)),
            "p95": int(np.percentile(values, 95))}


def tokenizer_for(recipe: Any) -> tuple[Any, str]:
    """(tokenizer, chat template) to encode the recipe's data with. The data paths are checked first: a typo is
    reported before anything is fetched. Only a model the registry cannot tokenize from shipped files (a local
    directory, a hub id it does not know, a variant with its own vocabulary) is resolved through the hub."""
    for source in sources(recipe.data):
        files.resolve(source.path, source.where)
    if recipe.data.eval_path:
        files.resolve(recipe.data.eval_path, "data.eval_path")
    from finetune.models import registry, tokenizers

    spec = registry.known_spec(recipe.model, recipe.variant)
    tokenizer = tokenizers.for_variant(spec) if spec else None
    if tokenizer is None:
        from transformers import AutoTokenizer

        from finetune.models import hub

        resolved = hub.resolve(recipe)
        if resolved.spec is None:
            raise UserError(f"model {recipe.model} is not a known family, so its chat format is unknown; use a "
                            f"registry model (`finetune list models`)")
        spec, tokenizer = resolved.spec, AutoTokenizer.from_pretrained(resolved.path)
    return tokenizer, spec.family.template


def inspect(recipe: Any, tokenizer: Any, template: str, *, preview: int = 3) -> dict[str, Any]:
    """The `finetune data --json` report: kind (kinds.py), count, eval_count, dropped {reason: n}, skipped (how
    many of those were bad records, left out under data.on_bad_record=skip; the rest had too long prompts),
    truncated, tokens (stats of what is trained on, after truncation), histogram (of rendered lengths before
    truncation), padding_waste, and examples: the first `preview` training rows exactly as the trainer receives
    them."""
    splits, dropped, kind = prepare(recipe, tokenizer, template)
    train = splits["train"]
    max_length = recipe.train.max_length
    preference = kind != "conversations"
    keys = list(RENDERED[kind])
    if preference:  # paired: the chosen answer is the one trained towards; unpaired: the judged answer
        prompts, chosen = column(train, "prompt_ids"), column(train, keys[1])
        lengths = [len(p) + len(c) for p, c in zip(prompts, chosen)]
        trained = sum(len(c) for c in chosen)
        rows = train
    else:
        labels = column(train, "labels")
        lengths = [len(row) for row in labels]
        trained = sum(sum(1 for v in row if v != IGNORE) for row in labels)
        rows = pack(train, max_length, recipe.data.num_proc) if recipe.data.packing else train
        if recipe.data.packing:
            keys += ["position_ids"]
    full = column(train, "_length")
    counts, edges = np.histogram(full or [0], bins=HISTOGRAM_BINS, range=(min(full or [0]), max(full or [0]) + 1))
    row_lengths = [len(r) for r in column(rows, keys[0])] if not preference else lengths
    return {
        "template": template, "kind": kind, "max_length": max_length,
        "packing": bool(recipe.data.packing and not preference),
        "count": len(train), "eval_count": len(splits["eval"]) if "eval" in splits else 0,
        "rows": len(rows), "dropped": dict(sorted(dropped.items())),
        "skipped": sum(n for reason, n in dropped.items() if reason != "too_long_prompt"),
        "truncated": sum(column(train, "_truncated")),
        "tokens": _stats(lengths, trained),
        "histogram": {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]},
        "padding_waste": {"micro_batch": recipe.train.micro_batch,
                          "share": round(padding_waste(row_lengths, recipe.train.micro_batch), 4)},
        "examples": [{k: row[k] for k in keys} for row in rows.select(range(min(preview, len(rows))))],
    }


def _segments(ids: list[int], labels: list[int], tokenizer: Any) -> list[tuple[str, str]]:
    """(text, style) runs: prompt tokens, trained tokens, and label substitutions (a label that is not the input
    token, e.g. Baichuan2's eos under a user token) shown as →label."""
    def state(i: int) -> str:
        return "prompt" if labels[i] == IGNORE else "trained" if labels[i] == ids[i] else "relabel"

    runs, start, previous = [], 0, ""
    for end in range(1, len(ids) + 1):
        if end < len(ids) and state(end) == state(start) and state(start) != "relabel":
            continue
        text = tokenizer.decode(ids[:end], skip_special_tokens=False)
        runs.append((text[len(previous):], state(start)))
        if state(start) == "relabel":
            runs.append((f"→{tokenizer.decode([labels[start]], skip_special_tokens=False)}", "relabel"))
        previous, start = text, end
    return runs


def render_inspect(report: dict[str, Any], tokenizer: Any) -> Any:
    """A rich renderable of the report: counts table, text histogram, first example with trained tokens lit."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"data · template {report['template']} · max_length {report['max_length']}",
                  show_header=False)
    table.add_row("kind", NAMES[report["kind"]])
    table.add_row("training examples", str(report["count"]))
    if report["packing"]:
        table.add_row("packed rows", str(report["rows"]))
    table.add_row("held-out examples", str(report["eval_count"]))
    table.add_row("truncated", str(report["truncated"]))
    if report["skipped"]:
        table.add_row("bad records skipped (data.on_bad_record=skip)", str(report["skipped"]))
    for reason, n in report["dropped"].items() or [("", 0)]:
        table.add_row(f"dropped{': ' + reason if reason else ''}", str(n))
    tokens = report["tokens"]
    table.add_row("tokens (trained)", f"{tokens['total']:,} ({tokens['trained']:,})")
    table.add_row("length min/p50/p95/max", f"{tokens['min']} / {tokens['p50']} / {tokens['p95']} / {tokens['max']}")
    table.add_row(f"padding waste (micro_batch {report['padding_waste']['micro_batch']})",
                  f"{report['padding_waste']['share']:.1%}")

    hist = report["histogram"]
    peak = max(hist["counts"]) or 1
    lines = Text("token length (rendered, before truncation)\n", style="bold")
    for lo, hi, n in zip(hist["edges"], hist["edges"][1:], hist["counts"]):
        over = " > max_length" if lo >= report["max_length"] else ""
        lines.append(f"{lo:>7}–{hi:<7} {'█' * round(40 * n / peak):<40} {n}{over}\n")

    example = Text(f"first {'packed row' if report['packing'] else 'example'} as the trainer receives it (",
                   style="bold")
    example.append("trained", style="bold green")
    example.append(" / ")
    example.append("not trained", style="dim")
    example.append(")\n", style="bold")
    if report["examples"]:
        first = report["examples"][0]
        if "labels" in first:
            styles = {"prompt": "dim", "trained": "bold green", "relabel": "bold magenta"}
            for text, kind in _segments(first["input_ids"], first["labels"], tokenizer):
                example.append(text, style=styles[kind])
        else:
            prompt = tokenizer.decode(first["prompt_ids"], skip_special_tokens=False)
            example.append(prompt, style="dim")
            answers = (("chosen_ids", "bold green", ""), ("rejected_ids", "red", "\nrejected: ")) \
                if report["kind"] == "paired" else \
                (("completion_ids", "bold green" if first["label"] else "red", ""),)
            for key, style, heading in answers:
                example.append(heading, style="bold")
                text = tokenizer.decode(first["prompt_ids"] + first[key], skip_special_tokens=False)
                example.append(text[len(prompt):], style=style)
            if report["kind"] == "unpaired":
                example.append(f"\njudged {'good' if first['label'] else 'bad'} (label {first['label']})",
                               style="bold")
    return Group(table, lines, example)


def save_length_histogram_png(report: dict[str, Any], path: Path | str) -> Path:
    """The length histogram as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    hist = report["histogram"]
    edges = hist["edges"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white")
    ax.axvline(report["max_length"], color="#c44e52", linestyle="--", label=f"max_length {report['max_length']}")
    ax.set_xlabel("tokens per example (rendered, before truncation)")
    ax.set_ylabel("examples")
    ax.set_title(f"{report['count']} examples · {report['template']} template")
    ax.legend()
    fig.tight_layout()
    return atomic.write_figure(path, fig, dpi=110)
