"""`finetune eval`: how good is the model a run made — answers scored against references, and benchmarks.

    generation.py  the run's held-out split (or eval.file=) answered greedily in the run's chat format → BLEU/ROUGE
    metrics.py     BLEU-4 and ROUGE-1/2/L as LLaMA-Factory and ChatGLM's ptuning compute them (jieba, rouge-chinese)
    choice.py      C-Eval / CMMLU / MMLU from their published files, scored by the answer letters' logits
    report.py      results.json, predictions.jsonl, scores.png, the table, the report.md section
    options.py     the command's key=value options

Loading is finetune.infer's (`load.resolve` + `backends.load`): the same weights, chat format, system prompt and stop
tokens as `finetune chat`, so an answer scored here is the answer chat gives. Everything is read and checked before
the model is loaded, and the results appear at once (a temporary directory renamed into place): a run's
`<run>/eval/` (`<run>/eval-base/` for base=true), or output_dir= for model=; an existing one is replaced only with
overwrite=true / --force.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import UserError
from finetune.evaluate.options import EvalOptions

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["run"]
log = logging.getLogger("finetune.eval")


def _progress(*args: Any, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(*args, file=sys.stderr, dynamic_ncols=True, **kwargs)


def _folder(options: EvalOptions) -> tuple[Path, Any]:
    """(where the results go, the run or None)."""
    from finetune.rundir import open_run

    if options.run:
        run = open_run(options.run)
        return run.path / ("eval-base" if options.base else "eval"), run
    if options.output_dir:
        return Path(options.output_dir).expanduser(), None
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(options.model)).name)
    return Path("outputs") / f"eval-{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}", None


def _source(options: EvalOptions, run: Any) -> Any:
    from finetune.infer import load

    source = load.resolve(options)
    if options.base:  # the weights the run started from, in the run's chat format
        weights = run.base().directory
        if not (weights / "config.json").is_file():
            raise UserError(f"the run's base model {weights} (base.json 'path') is gone; restore it to score it")
        source = replace(source, name=f"{source.name} (base)", weights=weights, adapters={}, serve_base=True)
    return source


def run(options: EvalOptions, out: "Console", err: "Console") -> int:
    from finetune import atomic
    from finetune.evaluate import choice, generation, metrics, report

    started = time.monotonic()
    folder, run_dir = _folder(options)
    if folder.exists() and not options.overwrite:
        raise UserError(f"{folder} already holds an evaluation; pass overwrite=true (or --force) to replace it")
    benchmark = options.eval.dir is not None
    generate = options.eval.file is not None or not benchmark
    if generate:
        metrics.require()
    if benchmark and options.backend != "transformers":
        raise UserError("benchmarks are scored from the model's logits: use backend=transformers (the default)")
    source = _source(options, run_dir) if run_dir else None  # a run's: small files only, and no weights is said first
    recipe = run_dir.recipe() if run_dir else None
    examples, what = generation.load_examples(options, recipe) if generate else ([], "")
    bench = choice.read(options.eval) if benchmark else None
    source = source or _source(options, None)  # model= may download: only after every file was checked

    from finetune.infer import backends, memory

    label = source.name if source.run or not source.adapters else f"{source.name} + {', '.join(source.adapters)}"
    err.print(f"[bold]eval[/]    {label} — {source.weights}"
              f"{' + ' + ', '.join(map(str, source.adapters.values())) if source.adapters else ''}")
    err.print(memory.describe(source, options))
    engine = backends.load(source, options)
    results: dict[str, Any] = {"model": label, "base": options.base, "template": source.template,
                               "weights": str(source.weights),
                               "adapters": {k: str(v) for k, v in source.adapters.items()},
                               "backend": options.backend,
                               "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    rows: list[dict[str, Any]] = []
    if generate:
        rows = generation.evaluate(engine, examples, options.eval.max_new_tokens, _progress)
        results["generation"] = generation.summary(rows, what, options.eval.max_new_tokens)
    answers: list[dict[str, Any]] = []
    if bench is not None:
        results["choice"] = choice.evaluate(engine, bench, options.eval.batch_size, _progress)
        answers = results["choice"].pop("answers")
    results["wall_s"] = round(time.monotonic() - started, 1)

    with atomic.directory(folder, replace=options.overwrite) as tmp:
        if rows:
            report.write_predictions(tmp / "predictions.jsonl", rows)
        if answers:
            report.write_predictions(tmp / "answers.jsonl", answers)
        atomic.write_json(tmp / "results.json", results)
        report.chart(results, tmp / "scores.png")
    out.print(report.table(results))
    if run_dir is not None:
        report.refresh(run_dir)
    err.print(f"[bold green]evaluated[/] in {results['wall_s']:.1f} s — {folder}/results.json"
              f"{f', report: {run_dir.report_file}' if run_dir else ''}")
    return 0
