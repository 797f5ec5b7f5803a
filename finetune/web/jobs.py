"""Training and export as real CLI subprocesses: started, watched through their log, stopped with SIGINT.

The page never waits on one: it starts `python -m finetune ...`, returns at once, and a timer reads the log and
metrics.jsonl. Stop sends SIGINT, the trainer's Ctrl-C: GracefulStop ends the step, saves a checkpoint and exits,
so the run can be resumed with `resume=RUN`. The log lives next to the run (`<run>.web.log`): the run directory
itself must not exist before the trainer creates it (rundir.create refuses a directory that is not a run).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from finetune.errors import UserError


@dataclass
class Job:
    argv: list[str]
    log: Path
    process: subprocess.Popen
    run: Optional[Path] = None

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def state(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        return {0: "done", 130: "stopped"}.get(code, f"failed (exit {code})")

    def stop(self) -> None:
        """Ctrl-C for the trainer: a checkpoint is saved after the current step."""
        if self.running:
            self.process.send_signal(signal.SIGINT)

    def tail(self, lines: int = 20) -> str:
        return log_tail(self.log, lines)


JOBS: dict[str, Job] = {}
"""The page's current job of each kind ("train", "export"): one local user, one of each at a time."""


def start(kind: str, args: list[str], log: Path, run: Optional[Path] = None, cwd: Optional[Path] = None) -> Job:
    """`python -m finetune ARGS` in the background, stdout and stderr into `log`."""
    current = JOBS.get(kind)
    if current is not None and current.running:
        raise UserError(f"a {kind} job is still running ({' '.join(current.argv[2:])}); stop it or wait")
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "finetune", *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    with log.open("w", encoding="utf-8") as handle:
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=cwd, env=env)
    JOBS[kind] = Job(argv, log, process, run)
    return JOBS[kind]


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log as a terminal would show them (a progress bar's \\r redraws keep the last one)."""
    if not Path(path).is_file():
        return ""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    shown = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])


def ollama_create(text: str) -> Optional[str]:
    """The `ollama create NAME -f .../Modelfile` line an export printed, if any."""
    found = re.search(r"^\s*(ollama create \S+ -f .+?)\s*$", text, re.M)
    return found.group(1) if found else None
