"""What a run shows and keeps while it trains: metrics.jsonl, a progress bar with memory next to the estimate,
Ctrl-C that saves a checkpoint before stopping, and the measured peak memory.

All writing happens on rank 0 (`state.is_world_process_zero`); every rank takes part in the stop decision, so a
Ctrl-C seen by one process stops all of them at the same step (they would deadlock otherwise).
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from finetune import atomic
from finetune.runfiles import read_metrics

GIB = 2**30


def memory_now() -> dict[str, int]:
    """Memory in use on this process's device: CUDA allocator figures on a GPU, peak RSS on CPU."""
    if torch.cuda.is_available():
        return {"gpu_allocated_bytes": torch.cuda.memory_allocated(), "gpu_reserved_bytes": torch.cuda.memory_reserved(),
                "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    return {"host_peak_rss_bytes": _proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _proc_status(key: str) -> Optional[int]:
    """A byte figure of /proc/self/status (Linux: VmRSS now, VmHWM its peak); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _restart_peak_rss() -> bool:
    """Make VmHWM start again from the current RSS (Linux ≥ 4.0: writing 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def _page_in(model: torch.nn.Module) -> None:
    """Read every weight once. transformers leaves a safetensors file's tensors memory-mapped when their dtype is the
    file's: their pages would come in during the first step and count as what training adds."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.numel() and not tensor.is_meta:
            tensor.detach().reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()  # one per 4 KiB page


class PeakMemory(TrainerCallback):
    """The measured peak of the training loop (weights, optimizer, activations), for `summary.json` next to the
    estimate. On a GPU: the CUDA allocator's peaks. On CPU the allocator keeps no figures, so the process's RSS
    stands in, measured so that it compares with the estimate: RSS when training starts (the libraries, the data
    and the loaded weights, already resident) and the peak RSS during training, restarted at that moment, so
    their difference is what training adds (gradients, optimizer states, activations: the estimate's terms above
    the weights). The process's all-time peak would also hold the model loading's transient copies."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self.rss_at_start: Optional[int] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        if model is not None:
            _page_in(model)
        if _restart_peak_rss():
            self.rss_at_start = _proc_status("VmRSS")

    def on_train_end(self, args, state, control, **kwargs):
        self.peak = {k: v for k, v in memory_now().items() if "peak" in k}
        if self.rss_at_start is not None:
            self.peak["host_rss_at_train_start_bytes"] = self.rss_at_start


class MetricsLog(TrainerCallback):
    """One JSON object per log event (train loss, eval loss, lr, tokens) appended to metrics.jsonl by rank 0."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.monotonic()

    def on_log(self, args, state, control, logs: Optional[dict[str, Any]] = None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, "elapsed_s": round(time.monotonic() - self.started, 3),
               **logs}
        if torch.cuda.is_available():
            row.update(memory_now())
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, default=float) + "\n")


def keep_metrics_until(path: Path, step: int) -> None:
    """On resume: drop the lines a killed run logged after its last checkpoint (they are logged again), and a last
    line it was killed while writing."""
    if not path.is_file():
        return
    rows = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    atomic.write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


class Progress(ProgressCallback):
    """transformers' tqdm bar, with memory in use / peak beside the estimate, and one short line per log."""

    def __init__(self, estimate_bytes: Optional[int]) -> None:
        super().__init__()
        self.estimate_bytes = estimate_bytes

    def _memory(self) -> str:
        if not torch.cuda.is_available():
            return ""
        now = memory_now()
        text = f"{now['gpu_reserved_bytes'] / GIB:.1f}/{now['gpu_peak_reserved_bytes'] / GIB:.1f} GiB"
        return text + (f" (est {self.estimate_bytes / GIB:.1f})" if self.estimate_bytes else "")

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if state.is_world_process_zero and self.training_bar is not None and torch.cuda.is_available():
            self.training_bar.set_postfix_str(f"mem {self._memory()}", refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        shown = {"loss": "loss", "eval_loss": "eval_loss", "learning_rate": "lr", "grad_norm": "grad_norm",
                 "train_loss": "train_loss", "train_runtime": "runtime_s"}
        parts = [f"{label} {logs[key]:.4g}" for key, label in shown.items() if isinstance(logs.get(key), (int, float))]
        if parts:
            memory = self._memory()
            self.training_bar.write(f"step {state.global_step}/{state.max_steps}: " + ", ".join(parts)
                                    + (f", mem {memory}" if memory else ""), file=sys.stderr)


class GracefulStop(TrainerCallback):
    """Ctrl-C (SIGINT) ends the current optimizer step, saves a checkpoint and stops; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self.interrupted = False
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed(args):
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _agreed(self, args) -> bool:
        """True on every rank as soon as any rank saw Ctrl-C (one tiny all-reduce per step, only when distributed)."""
        if args.world_size == 1 or not dist.is_initialized():
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
