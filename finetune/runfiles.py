"""The JSON files of a run directory as typed records, each parsed in one place (finetune.rundir opens the files).

    base.json      RunBase      the base model training loaded: export, chat/serve, eval and DPO find it again
    summary.json   RunSummary   the end of a finished run
    estimate.json  RunEstimate  the verdict training started under (the file holds the whole `finetune estimate
                                --json` object; a run reads back only the verdict and the peak)
    metrics.jsonl  read_metrics one row per Trainer log event

The keys on disk are the field names, so runs written before these records existed load unchanged: a key a
record does not know is ignored (a newer run read by older code), an optional key that is missing takes its
default, and a missing required key or a file that is not JSON is one clear error naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from finetune.errors import UserError

R = TypeVar("R")


def _parse(cls: type[R], path: Path) -> R:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); the run that wrote it was cut short") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds {type(data).__name__}, not a JSON object")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise UserError(f"{path} has no {', '.join(repr(m) for m in missing)}; it was not written by finetune")
    return cls(**{f.name: data[f.name] for f in fields if f.name in data})


class _RunFile:
    """A record kept in one JSON file of a run: read back through `_parse`, written as its fields."""

    @classmethod
    def read(cls: type[R], path: Path) -> R:
        return _parse(cls, path)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class RunBase(_RunFile):
    """base.json: the base model a run trained on, as export, chat/serve, eval and DPO need to find and format it.

    Only `path` is required: runs and tests that predate a field, or a model outside the registry (no variant,
    family, template or native class), still load."""

    path: str  # the local native checkpoint training loaded (as a string: the JSON keeps what was written)
    source: Optional[str] = None  # one line for people: where the weights came from
    model: Optional[str] = None  # the registry name (or the model= given, outside the registry)
    variant: Optional[str] = None
    family: Optional[str] = None
    template: Optional[str] = None  # chat format (finetune.models.chat)
    native_class: Optional[str] = None
    method: Optional[str] = None

    @property
    def directory(self) -> Path:
        return Path(self.path).expanduser()



@dataclass(frozen=True)
class RunSummary(_RunFile):
    """summary.json: the figures of a finished run (losses, throughput, time, estimate vs measured memory)."""

    model: str
    source: str
    method: str
    stage: str
    world_size: int
    device: str  # "cuda" or "cpu"
    global_step: int
    train_runtime_s: float
    wall_s: float
    next: str  # the command to run next (export)
    weights: str  # adapter/ or model/
    status: str = "finished"
    final_loss: Optional[float] = None
    final_eval_loss: Optional[float] = None
    train_loss: Optional[float] = None
    train_tokens: Optional[int] = None
    tokens_per_second: Optional[float] = None
    estimate_peak_bytes: Optional[int] = None
    estimate_training_bytes: Optional[int] = None  # the estimate above the loaded weights, no CUDA context
    memory: dict[str, int] = field(default_factory=dict)  # measured peaks (callbacks.PeakMemory)
    resumed_from: Optional[str] = None  # the checkpoint this run continued
    ranks: list[dict[str, Any]] = field(default_factory=list)  # each process's own report (distributed.rank_info)
    trust_remote_code: bool = False



@dataclass(frozen=True)
class RunEstimate(_RunFile):
    """estimate.json as a run reads it back: the verdict it started under and the peak it expected per GPU. The
    file keeps the whole estimate (`finetune estimate --json`: breakdown, phases, suggestions) for people."""

    verdict: str
    fits: Optional[bool] = None  # None: nothing to compare against (no GPU, no gpu_mem=)
    peak_bytes: Optional[int] = None  # None: a model outside the registry has no estimate
    forced: bool = False  # started with --force although it did not fit


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows, oldest first. A row is whatever the Trainer logged at that step (loss, eval_loss,
    learning_rate, grad_norm, num_tokens, each TRL stage's own rewards/... keys) plus step, epoch, elapsed_s and
    memory: an open set of keys, so rows stay dicts. A line that is not a JSON object is skipped: the last line of
    a run that is being written, or one killed mid-write, is cut short."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
