"""The GPU check: everything one device call of at most 8 minutes should measure, written as tables to --out.

    python scripts/gpu_check.py --out "$OUT" [--budget-s 420]      # on one H100/H200 (scripts/gpu_check.sh)
    python scripts/gpu_check.py --out DIR --cpu-smoke               # the same driver on tiny shapes, CPU only

1. Memory: peak torch.cuda.max_memory_allocated / max_memory_reserved (plus the CUDA context) of a few optimizer
   steps against `finetune.estimate`'s plan, for Qwen2.5-7B and Llama-2-7B × LoRA / QLoRA × 512 / 2048 / 8192 tokens
   and Qwen2.5-0.5B full at 512 / 2048; weights of the real shapes from the shipped configs (nothing is
   downloaded there), prepared as training prepares them (scripts/bench_memory.py's builder), micro batch 1, each
   base recipe's own settings (checkpointing on, its optimizer).
2. Speed: tokens/s and MFU of finetune's training path against a plain TRL SFTTrainer, Qwen2.5-7B QLoRA at 2048
   tokens (packed rows of zh + en records), TRL's liger kernels off and on. The 7B checkpoint is written once,
   random, in bf16 to a scratch directory so that both load it as a user's model would be loaded.

One process per group (a model's memory cells; the speed runs), each with a deadline cut from the whole budget:
a group that runs out of time is killed and keeps the cells it finished (each cell's row is appended to rows.jsonl
as soon as it is measured); every planned cell without a row is listed as "not measured", never estimated.
Tables: memory.md/.csv, speed.md/.csv, summary.json (rows, device, versions), logs/<group>.log.

--cpu-smoke: one process, tiny_qwen2_5 / tiny_llama2 at 32 tokens for the memory cells (one optimizer step) and
tiny_qwen2_5 at 512 for the speed runs (one step); memory columns are n/a (no CUDA allocator) and liger is not
measured (it needs a GPU). It proves the driver, the subprocess, the deadlines and the tables, in well under a
minute on a quiet 2-core CPU.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
GiB = 2**30
MIN_GROUP_S = 25
"""A group that cannot get this long is not started (model build + one step would not finish)."""


@dataclass(frozen=True)
class Cell:
    table: str  # "memory" | "speed"
    model: str
    method: str
    seq: int
    trainer: str = ""  # speed: "finetune" | "plain TRL"
    liger: bool = False

    @property
    def key(self) -> str:
        return f"{self.table}/{self.model}/{self.method}/{self.seq}/{self.trainer}/{'liger' if self.liger else ''}"


@dataclass(frozen=True)
class Group:
    name: str
    cells: tuple[Cell, ...]
    cap_s: int  # planned seconds; the budget left may cut it


def plan(smoke: bool) -> list[Group]:
    """The matrix, cheapest and most wanted first (the 8192-token cells last in each model's group)."""
    if smoke:  # one process, the fewest cells that still pass through every path (~7 s of imports per process)
        cells = (Cell("memory", "tiny_qwen2_5", "lora", 32), Cell("memory", "tiny_qwen2_5", "qlora", 32),
                 Cell("memory", "tiny_llama2", "lora", 32), Cell("memory", "tiny_qwen2_5", "full", 32),
                 *(Cell("speed", "tiny_qwen2_5", "qlora", 512, trainer, liger)
                   for liger in (False, True) for trainer in ("finetune", "plain TRL")))
        return [Group("smoke", cells, 120)]
    mem = [Group(f"memory-{m}", tuple(Cell("memory", m, method, seq) for seq in (512, 2048, 8192)
                                      for method in ("lora", "qlora")), 90) for m in ("qwen2_5_7b", "llama2_7b")]
    mem.append(Group("memory-qwen2_5_0_5b-full", tuple(Cell("memory", "qwen2_5_0_5b", "full", seq)
                                                       for seq in (512, 2048)), 40))
    speed = tuple(Cell("speed", "qwen2_5_7b", "qlora", 2048, trainer, liger)
                  for liger in (False, True) for trainer in ("finetune", "plain TRL"))
    return [*mem, Group("speed", speed, 200)]


# ------------------------------------------------------------------------------------------ inside a group
def context_bytes() -> int:
    import torch

    torch.ones(1, device="cuda") @ torch.ones(1, 1, device="cuda")  # the context and cuBLAS handle
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def memory_recipe(cell: Cell, smoke: bool):
    from finetune import config

    cpu = ["train.optimizer=adamw_torch"] if smoke else []  # paged optimizers need CUDA
    return config.load(f"base/{cell.method}", [f"model={cell.model}", f"train.max_length={cell.seq}",
                                               "train.micro_batch=1", "train.grad_accum=1", "distributed=none",
                                               "num_gpus=1", *cpu])


def measure_memory(cell: Cell, smoke: bool, context: int) -> dict[str, Any]:
    """Peak of `steps` optimizer steps after the model is built, against the estimate of the same recipe."""
    import torch

    import bench_memory
    from finetune.estimate.memory import plan as estimate
    from finetune.models import registry

    steps = 1 if smoke else 3  # the optimizer's states exist from the first step
    recipe = memory_recipe(cell, smoke)
    spec = registry.spec(recipe.model, recipe.variant)
    est = estimate(recipe, spec, num_gpus=1)
    paged = recipe.train.optimizer.startswith("paged")  # unified memory: torch does not count it
    row: dict[str, Any] = {"estimate_gib": est.peak_bytes / GiB, "peak_phase": est.peak_phase,
                           "estimate_terms_gib": {k: round(v / GiB, 3) for k, v in est.breakdown.items()},
                           "ckpt": recipe.train.gradient_checkpointing, "optimizer": recipe.train.optimizer}
    device = "cpu" if smoke else "cuda"
    model = optimizer = None
    try:
        model, optimizer = bench_memory.build(recipe, spec, device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        bench_memory.train_steps(model, optimizer, recipe, steps, device)
        if device == "cuda":
            torch.cuda.synchronize()
            allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            compared = est.peak_bytes - (est.breakdown.get("optimizer", 0) if paged else 0)
            measured = reserved + context
            row.update(allocated_gib=allocated / GiB, reserved_gib=reserved / GiB, measured_gib=measured / GiB,
                       error_pct=100 * (compared - measured) / measured)
        row.update(status="ok", seconds=time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM")
    except Exception as exc:  # one broken cell must not lose the others
        row.update(status=f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}")
    finally:
        del model, optimizer
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def random_checkpoint(model: str, out: Path) -> Path:
    """A loadable model directory of the registry model's real shape: random bf16 weights + the shipped tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.models import registry, tiny
    from finetune.models.native import native_config

    if (out / "config.json").is_file():
        return out
    spec = registry.spec(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        net = AutoModelForCausalLM.from_config(native_config(spec), dtype=torch.bfloat16)
    net.save_pretrained(out)
    tiny._tokenizer(spec.family.name).save_pretrained(out)
    del net
    gc.collect()
    return out


def speed_setting(cell: Cell, smoke: bool, work: Path):
    import bench_train
    from finetune.models import registry

    model = cell.model if registry.spec(cell.model).model.tiny else str(random_checkpoint(cell.model, work / "ckpt"))
    data = work / "zh_en.json"
    if not data.is_file():
        bench_train.write_realistic_data(data, n=60 if smoke else 400)
    return bench_train.Setting(
        model=model, data=data, steps=1 if smoke else 12, micro_batch=1, max_length=cell.seq, method="qlora",
        precision="bf16", lr=1e-4, lora_r=64, lora_alpha=16, lora_dropout=0.05,
        optimizer="adamw_torch" if smoke else "paged_adamw_8bit", gradient_checkpointing=True, packing=True,
        liger=cell.liger, logging_steps=1)


def measure_speed(cell: Cell, smoke: bool, work: Path, peaks: dict[str, float]) -> dict[str, Any]:
    import torch

    import bench_train
    import mfu

    if cell.liger and smoke:
        return {"status": "not measured: liger-kernel needs a CUDA GPU"}
    s = speed_setting(cell, smoke, work)
    if cell.liger and cell.trainer == "finetune":
        from finetune import config

        if "train.kernels" not in config.schema_keys():
            return {"status": "not measured: this checkout has no train.kernels recipe key"}
    if "bf16" not in peaks:
        peaks["bf16"] = mfu.matmul_peak(torch.bfloat16, bench_train.device(), n=256 if smoke else 8192)
    try:
        run = (bench_train.run_ours if cell.trainer == "finetune" else bench_train.run_plain)(s, work)
    except Exception as exc:
        return {"status": f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    per_token = bench_train.flops_per_token(s, cell.seq)  # packed rows: every position attends over the row
    return {"status": "ok", "tokens_per_s": run.tokens_per_s, "tokens": run.tokens, "runtime_s": run.runtime_s,
            "final_loss": run.losses[-1] if run.losses else None, "flops_per_token": per_token,
            "matmul_peak_tflops": peaks["bf16"] / 1e12, "mfu_pct": 100 * run.tokens_per_s * per_token / peaks["bf16"],
            **{f"peak_{k}_gib": v / GiB for k, v in run.peak.items()}}


def run_group(name: str, smoke: bool, out: Path) -> int:
    """Measure one group's cells in this process, appending each row to rows.jsonl the moment it exists."""
    sys.path.insert(0, str(SCRIPTS))
    import torch

    group = next(g for g in plan(smoke) if g.name == name)
    context = context_bytes() if torch.cuda.is_available() else 0
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=os.environ.get("GPU_CHECK_SCRATCH")) as tmp:
        for cell in group.cells:
            started = time.perf_counter()
            if cell.table == "memory":
                row = measure_memory(cell, smoke, context)
            else:
                row = measure_speed(cell, smoke, Path(tmp), peaks)
            row.update(key=cell.key, **dataclasses.asdict(cell), wall_s=time.perf_counter() - started,
                       cuda_context_gib=context / GiB)
            with (out / "rows.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row, default=str) + "\n")
            print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    return 0


# ------------------------------------------------------------------------------------------ the orchestrator
def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "liger-kernel"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    gpu = (f"{torch.cuda.get_device_name()} ({torch.cuda.mem_get_info()[1] / GiB:.0f} GiB)"
           if torch.cuda.is_available() else "none (CPU)")
    return {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


MEMORY_COLUMNS = ("model", "method", "seq", "ckpt", "optimizer", "estimate_gib", "peak_phase", "allocated_gib",
                  "reserved_gib", "measured_gib", "error_pct", "status")
SPEED_COLUMNS = ("model", "method", "seq", "trainer", "liger", "tokens_per_s", "mfu_pct", "matmul_peak_tflops",
                 "peak_allocated_gib", "peak_reserved_gib", "peak_rss_above_start_gib", "final_loss", "status")


def table(rows: list[dict], columns: tuple[str, ...], title: str, note: str) -> tuple[str, str]:
    md = [f"## {title}", "", note, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({c: fmt(r.get(c)) for c in columns} for r in rows)
    return "\n".join(md) + "\n", buf.getvalue()


def write_tables(out: Path, groups: list[Group], outcomes: dict[str, str], env: dict[str, Any]) -> None:
    rows_file = out / "rows.jsonl"
    found = {}
    if rows_file.is_file():
        for line in rows_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                found[row["key"]] = row
    rows = []
    for group in groups:
        for cell in group.cells:
            rows.append(found.get(cell.key) or {**dataclasses.asdict(cell),
                                                "status": f"not measured ({outcomes.get(group.name, 'not run')})"})
    header = f"{env['date']}; GPU {env['gpu']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    memory = [r for r in rows if r["table"] == "memory"]
    speed = [r for r in rows if r["table"] == "speed"]
    for name, part, columns, title, note in (
            ("memory", memory, MEMORY_COLUMNS, "Peak memory: measured vs finetune's estimate",
             f"{header}. measured = max_memory_reserved + CUDA context; error = (estimate - measured) / measured "
             "(paged optimizers: their states live in unified memory, so the estimate's optimizer term is left out "
             "of the comparison). n/a: no CUDA allocator (CPU smoke)."),
            ("speed", speed, SPEED_COLUMNS, "Throughput: finetune vs plain TRL SFTTrainer",
             f"{header}. Non-pad tokens over train_runtime; MFU = tokens/s × (4N frozen + 6N trained + "
             "12·layers·hidden·seq) / this device's measured bf16 matmul peak (scripts/mfu.py).")):
        md, text = table(part, columns, title, note)
        (out / f"{name}.md").write_text(md, encoding="utf-8")
        (out / f"{name}.csv").write_text(text, encoding="utf-8")
    summary = {"environment": env, "groups": {g.name: outcomes.get(g.name, "not run") for g in groups}, "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")


def orchestrate(out: Path, smoke: bool, budget_s: float) -> int:
    deadline = time.monotonic() + budget_s
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    (out / "rows.jsonl").unlink(missing_ok=True)
    groups = plan(smoke)
    outcomes: dict[str, str] = {}
    for group in groups:
        left = deadline - time.monotonic()
        if left < MIN_GROUP_S:
            outcomes[group.name] = f"no time left in the {budget_s:.0f} s budget"
            continue
        limit = min(group.cap_s, left) if not smoke else left
        cmd = [sys.executable, str(Path(__file__).resolve()), "--group", group.name, "--out", str(out)]
        cmd += ["--cpu-smoke"] if smoke else []
        started = time.monotonic()
        with (out / "logs" / f"{group.name}.log").open("w") as log:
            try:
                done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
                outcomes[group.name] = "ok" if done.returncode == 0 else f"group process failed, rc {done.returncode}"
            except subprocess.TimeoutExpired:
                outcomes[group.name] = f"group stopped at its {limit:.0f} s limit"
        print(f"gpu_check: {group.name}: {outcomes[group.name]} ({time.monotonic() - started:.0f} s)", flush=True)
    write_tables(out, groups, outcomes, environment())
    for name in ("memory", "speed"):
        print((out / f"{name}.md").read_text(encoding="utf-8"))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the tables go ($OUT on the device machine)")
    parser.add_argument("--budget-s", type=float, default=420, help="seconds for every group together")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: proves the driver and tables")
    parser.add_argument("--group", help=argparse.SUPPRESS)  # internal: run one group in this process
    args = parser.parse_args(argv)
    if args.group:
        return run_group(args.group, args.cpu_smoke, args.out)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch; use --cpu-smoke on a CPU", file=sys.stderr)
        return 2
    return orchestrate(args.out, args.cpu_smoke, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
