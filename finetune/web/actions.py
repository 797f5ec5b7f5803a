"""The Train and Export tabs' buttons: each validates with the CLI's own code, then starts the CLI as a subprocess
(jobs.py) and returns at once; `watch_*` is what the page's timer calls to show progress."""

from __future__ import annotations

import shlex
from typing import Any, Optional

from finetune import rundir
from finetune.errors import UserError
from finetune.export import gguf
from finetune.web import forms, guard, jobs, runs


def _shown(job: jobs.Job) -> str:
    return guard.redact(shlex.join(["finetune", *job.argv[3:]]))


def _error(exc: UserError) -> str:
    return guard.redact(f"error: {exc}")


def start_training(outputs: str, recipe_name: Optional[str], values: dict[str, Any], extra: Optional[str],
                   output_dir: Optional[str]) -> tuple[str, Optional[str]]:
    """(message, run directory): `finetune recipe=... key=value ... output_dir=RUN` started in the background.
    The run directory is the field's (relative to the outputs folder) or a new one, always inside that folder."""
    try:
        recipe, items = forms.resolve(recipe_name, values, extra)
        flags = forms.split_extra(extra)[1]
        run = guard.inside(outputs, output_dir or rundir.default_output_dir(recipe).name)
        args = [*forms.command(recipe_name, [i for i in items if not i.startswith("output_dir=")], flags),
                f"output_dir={run}"]
        job = jobs.start("train", args, run.with_name(run.name + ".web.log"), run)
    except UserError as exc:
        return _error(exc), None
    return f"started: `{_shown(job)}`", str(run)


def resume_training(outputs: str, run: Optional[str]) -> tuple[str, Optional[str]]:
    """`finetune recipe=RUN/recipe.yaml resume=RUN`: what the trainer itself tells you to run after a stop."""
    try:
        if not run:
            raise UserError("choose a run to resume")
        opened = rundir.open_run(guard.inside(outputs, run))
        if opened.last_checkpoint() is None:
            raise UserError(f"resume={opened.path}: it has no complete checkpoint yet")
        path = opened.path.resolve()
        job = jobs.start("train", [f"recipe={path / 'recipe.yaml'}", f"resume={path}"],
                         path.with_name(path.name + ".web.log"), path)
    except UserError as exc:
        return _error(exc), None
    return f"resumed: `{_shown(job)}`", str(path)


def stop_training() -> str:
    job = jobs.JOBS.get("train")
    if job is None or not job.running:
        return "no training is running"
    job.stop()
    return "stopping: a checkpoint is saved after the current step"


def watch_training() -> tuple[str, list[list[float]], str]:
    """(status line, [[step, loss], ...], log tail) of the page's current training job."""
    job = jobs.JOBS.get("train")
    if job is None:
        return "no training started from this page yet", [], ""
    p = runs.watched(job.run)
    text = f"**{job.state()}** · {job.run.name} · {runs.progress_text(p)}"
    return text, [[float(s), float(v)] for s, v in p["losses"]], guard.redact(job.tail(15))


def start_export(outputs: str, run: Optional[str], target: str, quant: Optional[str]) -> str:
    try:
        if not run:
            raise UserError("choose a run to export")
        opened = rundir.open_run(guard.inside(outputs, run))
        if target not in rundir.EXPORT_TARGETS:
            raise UserError(f"unknown export target '{target}'; choose one of {', '.join(rundir.EXPORT_TARGETS)}")
        args = ["export", f"run={opened.path.resolve()}", f"to={target}", *([f"quant={quant}"] if quant and target in ("gguf", "ollama") else [])]
        path = opened.path.resolve()
        job = jobs.start("export", args, path.with_name(f"{path.name}.export-{target}.web.log"), path)
    except UserError as exc:
        return _error(exc)
    return f"started: `{_shown(job)}`"


def watch_export() -> tuple[str, str, str]:
    """(state, log tail, the `ollama create` line once the export printed it)."""
    job = jobs.JOBS.get("export")
    if job is None:
        return "", "", ""
    log = guard.redact(jobs.log_tail(job.log, 400))
    return f"**{job.state()}** · `{_shown(job)}`", "\n".join(log.split("\n")[-15:]), jobs.ollama_create(log) or ""


def quant_names() -> list[str]:
    return list(gguf.QUANTS)
