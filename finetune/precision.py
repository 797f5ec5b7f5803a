"""`train.precision=auto`: the precision this machine trains fastest in without losing the run, and why.

- GPUs: bf16 where every visible GPU computes in it natively (compute capability ≥ 8.0: Ampere and later), else
  fp16 with loss scaling (a V100 or T4 has no bf16 units; transformers refuses bf16 there).
- No GPU: bf16 autocast where the CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16: oneDNN then runs a
  bf16 matmul at about twice fp32's rate — 2.1× for 2048² on an EPYC with avx512_bf16), else fp32 (bf16 would be
  emulated, slower than fp32).

`finetune.config.load` resolves `auto` once, so the run's saved recipe holds the precision it trained in (a resume
or an export on another machine keeps it); `why()` says what this machine offers, for the dry run and the run's
first lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from finetune.schema import Precision

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of CPUs with bf16 matmul instructions, the faster first."""


@dataclass(frozen=True)
class Choice:
    precision: Precision
    why: str


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where the file does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capability of every GPU torch can train on ([] without one; torch is imported only then)."""
    from finetune.estimate import gpu

    if not gpu.detect():
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


@cache
def auto() -> Choice:
    """What `train.precision=auto` means on this machine."""
    capabilities = _gpu_capabilities()
    if capabilities:
        if all(major >= 8 for major, _ in capabilities):
            return Choice("bf16", "the GPUs compute in bf16 natively (compute capability ≥ 8.0)")
        return Choice("fp16", "a GPU here has no bf16 units (compute capability < 8.0): fp16 with loss scaling")
    flag = next((f for f in BF16_CPU_FLAGS if f in cpu_flags()), None)
    if flag:
        return Choice("bf16", f"no GPU; this CPU multiplies bf16 in hardware ({flag}), about twice fp32's rate")
    return Choice("fp32", "no GPU, and this CPU has no bf16 instructions (amx_bf16 / avx512_bf16): bf16 would be "
                          "emulated, slower than fp32")


def resolve(precision: str) -> Precision:
    """`auto` → this machine's choice; any other value as given."""
    return auto().precision if precision == "auto" else precision  # type: ignore[return-value]


def why(precision: str) -> str:
    """One line on `precision` here: what auto would choose, and whether the given value agrees."""
    best = auto()
    if precision == best.precision:
        return f"{precision}: {best.why}"
    return f"{precision} as the recipe says (train.precision=auto would choose {best.precision}: {best.why})"
