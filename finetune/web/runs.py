"""The Train tab's reading side: runs under outputs/, a run's metrics.jsonl turned into what the page shows.

Read-only and tolerant: a run that is being written has a half line at the end of metrics.jsonl, no summary.json
yet, maybe no checkpoint; none of that is an error here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from finetune.errors import UserError
from finetune.rundir import RunDir, is_run
from finetune.runfiles import RunEstimate
from finetune.web import guard

GiB = 2**30


def progress(rows: list[dict[str, Any]], estimate: Optional[RunEstimate] = None) -> dict[str, Any]:
    """The live figures: step, loss, tokens per second (between the last two logs with token counts), GPU memory
    now and at its peak (on a GPU) next to the estimate's peak."""
    train = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    last = train[-1] if train else {}
    counted = [r for r in rows if isinstance(r.get("num_tokens"), (int, float)) and "elapsed_s" in r]
    tokens_per_s = None
    if len(counted) >= 2 and counted[-1]["elapsed_s"] > counted[-2]["elapsed_s"]:
        tokens_per_s = (counted[-1]["num_tokens"] - counted[-2]["num_tokens"]) / \
            (counted[-1]["elapsed_s"] - counted[-2]["elapsed_s"])
    elif counted and counted[-1]["elapsed_s"] > 0:
        tokens_per_s = counted[-1]["num_tokens"] / counted[-1]["elapsed_s"]
    memory = [r for r in rows if "gpu_reserved_bytes" in r]
    return {
        "step": max((r.get("step", 0) for r in rows), default=0),
        "loss": last.get("loss"),
        "tokens_per_s": tokens_per_s,
        "gpu_now_bytes": memory[-1]["gpu_reserved_bytes"] if memory else None,
        "gpu_peak_bytes": max(r.get("gpu_peak_reserved_bytes", 0) for r in memory) if memory else None,
        "estimate_bytes": estimate.peak_bytes if estimate else None,
        "losses": [(r["step"], r["loss"]) for r in train if "step" in r],
    }


def progress_text(p: dict[str, Any]) -> str:
    """One line for people: `step 12 · loss 1.234 · 850 tokens/s · GPU 10.1 GiB now / 11.0 peak (estimate 11.5)`."""
    parts = [f"step {p['step']}"]
    if p["loss"] is not None:
        parts.append(f"loss {p['loss']:.4g}")
    if p["tokens_per_s"] is not None:
        parts.append(f"{p['tokens_per_s']:,.0f} tokens/s")
    estimate = f"estimate {p['estimate_bytes'] / GiB:.2f} GiB" if p["estimate_bytes"] else "no estimate"
    if p["gpu_now_bytes"] is not None:
        parts.append(f"GPU {p['gpu_now_bytes'] / GiB:.2f} GiB now / {p['gpu_peak_bytes'] / GiB:.2f} peak "
                     f"({estimate})")
    else:
        parts.append(f"GPU memory: not measured on CPU ({estimate})")
    return " · ".join(parts)


def status(run: RunDir) -> str:
    """finished / stopped at checkpoint-N (resumable) / started (no checkpoint yet)."""
    if run.summary_file.is_file():
        return "finished"
    checkpoint = run.last_checkpoint()
    return f"stopped at {checkpoint.name} (resumable)" if checkpoint else "started, no checkpoint"


def list_runs(outputs: Path) -> list[dict[str, Any]]:
    """Every run directory directly under `outputs`, newest first: name, status, steps, last loss, path."""
    found = [p for p in Path(outputs).iterdir() if p.is_dir() and is_run(p) and not p.name.startswith(".")] \
        if Path(outputs).is_dir() else []  # hidden: a run being replaced (rundir.claim)
    rows = []
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        run = RunDir(path)
        p = progress(run.metrics())
        rows.append({"run": path.name, "status": status(run), "step": p["step"],
                     "loss": None if p["loss"] is None else round(p["loss"], 4),
                     "report": run.report_file.is_file(), "path": str(path.resolve())})
    return rows


def report_text(outputs: str, path: Optional[str]) -> str:
    """report.md of a run inside the outputs folder (or a note saying why there is none yet)."""
    if not path:
        return ""
    try:
        run = RunDir(guard.inside(outputs, path))
    except UserError as exc:
        return f"error: {exc}"
    if run.report_file.is_file():
        return guard.redact(run.report_file.read_text(encoding="utf-8"))
    return f"*{run.path.name}: no report.md yet ({status(run)})*"


def watched(path: Path) -> dict[str, Any]:
    """`progress` of the run at `path` while it trains: its rows so far next to the estimate it started under (none
    when that file is not a whole estimate: the page shows what it can)."""
    run = RunDir(Path(path))
    try:
        estimate = run.estimate()
    except UserError:
        estimate = None
    return progress(run.metrics(), estimate)
