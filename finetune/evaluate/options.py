"""The key=value options of `finetune eval` (no heavy imports: `--help` and bad keys answer at once).

What to load is `finetune chat`'s (finetune.infer.options.LoadOptions): `run=` a training run, or `model=` with an
optional `adapter=`. `base=true` with `run=` scores the run's base model (its adapter left off, or the weights it
started from) on the same data in the same chat format: the "before" of a before/after comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from finetune.config import parse_options
from finetune.errors import UserError, did_you_mean
from finetune.infer.options import LoadOptions

TASKS = ("ceval", "cmmlu", "mmlu")
SPLITS = {"ceval": "val", "cmmlu": "test", "mmlu": "test"}
"""The split scored by default: the one each benchmark publishes answers for (C-Eval's test answers are hidden)."""


@dataclass
class EvalSettings:
    file: Optional[str] = None  # generation eval on this file (any format finetune data reads) instead of the split
    format: str = "auto"  # eval.file's format (data.format's names)
    dir: Optional[str] = None  # a benchmark's local directory (its published layout)
    task: Optional[str] = None  # ceval | cmmlu | mmlu
    split: Optional[str] = None  # default: val for ceval, test for cmmlu and mmlu
    shots: int = 0  # 0 or 5: dev examples as earlier chat turns
    subjects: Optional[str] = None  # a,b,c: only these subjects (file stems without _val/_test)
    limit: Optional[int] = None  # at most N examples (per subject for a benchmark): a quick look
    max_new_tokens: int = 512  # generation eval: greedy, at most this many new tokens
    batch_size: int = 8  # benchmark prompts scored per forward pass


@dataclass
class EvalOptions(LoadOptions):
    eval: EvalSettings = field(default_factory=EvalSettings)
    base: bool = False  # with run=: score the run's base model instead (before/after)
    output_dir: Optional[str] = None  # with model=: where results go (default outputs/eval-<model>-<time>)
    overwrite: bool = False  # replace an existing eval directory (same as --force)


def parse(pairs: list[str], force: bool = False) -> EvalOptions:
    """`key=value` items → EvalOptions; an unknown key is one error naming the valid ones."""
    options: EvalOptions = parse_options(EvalOptions, pairs, "eval", exclude=("adapters",))
    options.overwrite = options.overwrite or force
    check(options)
    return options


def check(options: EvalOptions) -> None:
    """What can be said wrong before anything is read or loaded."""
    settings = options.eval
    if settings.task is not None and settings.task not in TASKS:
        raise UserError(f"unknown eval.task={settings.task}{did_you_mean(settings.task, TASKS)}; "
                        f"choose one of {', '.join(TASKS)}")
    if settings.task and not settings.dir:
        raise UserError(f"eval.task={settings.task} reads the benchmark from a local directory: add eval.dir=DIR "
                        f"(the unpacked {settings.task} files; they are not downloaded)")
    if settings.dir and not settings.task:
        raise UserError(f"eval.dir={settings.dir}: say which benchmark it holds with eval.task="
                        f"{'|'.join(TASKS)}")
    if settings.shots not in (0, 5):
        raise UserError(f"eval.shots={settings.shots}: use 0 or 5 (5-shot takes the first five dev questions)")
    if settings.limit is not None and settings.limit < 1:
        raise UserError(f"eval.limit={settings.limit}: give a positive number of examples")
    if settings.max_new_tokens < 1 or settings.batch_size < 1:
        raise UserError("eval.max_new_tokens and eval.batch_size must be positive")
    if options.base and not options.run:
        raise UserError("base=true scores a run's base model: add run=outputs/<run> (or give model=NAME alone)")
    if not options.run and not settings.file and not settings.dir:
        raise UserError("model= has no held-out split: give eval.file=PATH (any format `finetune data` reads) "
                        "or a benchmark with eval.dir=DIR eval.task=ceval|cmmlu|mmlu")
    if options.output_dir and options.run:
        raise UserError("a run's evaluation goes to <run>/eval/; output_dir= is for model=NAME")
