"""What an evaluation leaves: results.json, predictions.jsonl, scores.png, a table on stdout, a report.md section.

The section sits between markers, so evaluating again (overwrite=true) replaces it instead of adding a second one,
and the training report above it is kept as it is. When the run's base model was evaluated too (base=true), the
run's section sets both side by side: the before/after a user wants to see.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from finetune import atomic
from finetune.evaluate.metrics import METRICS

BEGIN, END = "<!-- finetune {} -->", "<!-- /finetune {} -->"
FOLDERS = ("eval-base", "eval")  # base first: the before, then the after


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _accuracy(row: dict[str, Any]) -> str:
    return f"{row['accuracy']:.2f} ({row['correct']}/{row['total']})"


def _rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, figure) lines: the generation metrics, then the benchmark's subjects, categories and overall."""
    rows = []
    gen = results.get("generation")
    if gen:
        rows += [(m.upper(), f"{gen[m]:.2f}") for m in METRICS]
    mc = results.get("choice")
    if mc:
        task = mc["task"]
        rows += [(f"{task} {s}", _accuracy(r)) for s, r in mc["subjects"].items()]
        rows += [(f"{task} [{c}]", _accuracy(r)) for c, r in mc["categories"].items()]
        rows.append((f"{task} overall ({mc['shots']}-shot, {mc['split']})", _accuracy(mc["overall"])))
    return rows


def table(results: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"finetune eval — {results['model']}")
    t.add_column("metric")
    t.add_column("score", justify="right")
    for name, value in _rows(results):
        t.add_row(name, value)
    return t


def chart(results: dict[str, Any], path: Path) -> Optional[Path]:
    """Bars: the generation metrics, and the benchmark's per-subject and overall accuracy (both 0-100)."""
    panels = []
    if results.get("generation"):
        panels.append(("generation (0-100)", [m.upper() for m in METRICS], [results["generation"][m] for m in METRICS]))
    mc = results.get("choice")
    if mc:
        names = list(mc["subjects"]) + ["overall"]
        panels.append((f"{mc['task']} accuracy % ({mc['shots']}-shot)", names,
                       [r["accuracy"] for r in mc["subjects"].values()] + [mc["overall"]["accuracy"]]))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    widths = [max(4.0, 0.45 * len(names) + 1.5) for _, names, _ in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (title, names, values) in zip(axes[0], panels):
        colors = ["tab:blue"] * len(names)
        if names[-1] == "overall":
            colors[-1] = "tab:orange"
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        slanted = len(names) > 4 or max(map(len, names)) > 8
        ax.set_xticks(range(len(names)), names, rotation=40 if slanted else 0, ha="right" if slanted else "center",
                      fontsize=8 if slanted else 10)
        ax.set_ylim(0, 105)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    return atomic.write_figure(path, fig, dpi=100, bbox_inches="tight")


def section(results: dict[str, Any], folder: str, other: Optional[dict[str, Any]]) -> str:
    """Markdown for report.md; `other` is the base model's results (or the run's) for a before/after column."""
    base = results.get("base", False)
    lines = [f"## Evaluation{' of the base model' if base else ''}", "",
             f"`finetune eval` on {results['created']}: {results['model']}."]
    gen = results.get("generation")
    if gen:
        lines += [f"Generation: {gen['count']} answers to {gen['data']}, greedy, at most {gen['max_new_tokens']} new "
                  f"tokens; predictions next to references in `{folder}/predictions.jsonl`."]
    mc = results.get("choice")
    if mc:
        lines += [f"Benchmark: {mc['task']} ({mc['split']} split, {mc['shots']}-shot) from `{mc['dir']}`, "
                  f"scored by the logits of the answer letters."]
    mine, theirs = dict(_rows(results)), dict(_rows(other)) if other else {}
    shared = [k for k in mine if k in theirs]
    lines.append("")
    if shared:
        before, after = (mine, theirs) if base else (theirs, mine)
        lines += ["| metric | base model | after training |", "|---|---:|---:|"]
        lines += [f"| {k} | {before[k]} | {after[k]} |" for k in shared]
    else:
        lines += ["| metric | score |", "|---|---:|", *[f"| {k} | {v} |" for k, v in mine.items()]]
    lines += ["", f"![evaluation]({folder}/scores.png)", ""]
    return "\n".join(lines)


def update_report(report: Path, key: str, text: str) -> None:
    """Put `text` in report.md between this evaluation's markers: replaced when there, appended otherwise."""
    begin, end = BEGIN.format(key), END.format(key)
    old = report.read_text(encoding="utf-8") if report.is_file() else ""
    block = f"{begin}\n{text}\n{end}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old)
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block
    atomic.write_text(report, new)


def refresh(run: Any) -> None:
    """The report.md sections of the run's evaluations (the base model's and the run's), each with the other's
    figures beside it when both exist."""
    found = {f: json.loads(p.read_text(encoding="utf-8")) for f in FOLDERS
             if (p := run.path / f / "results.json").is_file()}
    for folder, results in found.items():
        other = found.get("eval" if folder == "eval-base" else "eval-base")
        update_report(run.report_file, folder, section(results, folder, other))
