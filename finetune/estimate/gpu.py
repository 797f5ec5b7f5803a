"""The GPUs this process can use — name, memory, utilisation, processes — and the cards users commonly own.

The device list comes from torch when torch has CUDA (so CUDA_VISIBLE_DEVICES and torch's numbering hold), from
NVML (nvidia-ml-py) otherwise. Free memory, utilisation and processes come from NVML when it is there: asking
torch (`mem_get_info`) would create a CUDA context on every GPU (~0.5 GiB each) in every training process, so it
is only the fallback. No driver, no GPU, no CUDA build: an empty list, and `format_gpus` says why.
torch is imported only where it could see a GPU (a CUDA or ROCm build, with a driver for CUDA): importing it
takes seconds, and `finetune estimate` on a machine without a GPU should not wait for it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Optional

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

GiB = 1024**3

KNOWN_GPUS: dict[str, float] = {
    "RTX 3060 12GB": 12, "RTX 4060 Ti 16GB": 16, "T4 16GB": 16, "V100 16GB": 16, "V100 32GB": 32,
    "RTX 3090 24GB": 24, "RTX 4090 24GB": 24, "A10 24GB": 24, "L4 24GB": 24, "A6000 48GB": 48, "L40S 48GB": 48,
    "A100 40GB": 40, "A100 80GB": 80, "H100 80GB": 80, "H200 141GB": 141,
}
"""Cards users commonly train on, with the memory printed on the box (GiB, as `gpu_mem` takes it)."""


@dataclass
class GPUProcess:
    pid: int
    name: str
    used_bytes: Optional[int]


@dataclass
class GPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    utilization: Optional[int] = None  # percent, when NVML can tell
    processes: list[GPUProcess] = field(default_factory=list)

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.free_bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nvml() -> Any:
    """The initialised pynvml module, or None when there is no NVIDIA driver (or no nvidia-ml-py)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded / ImportError: no driver to ask
        return None


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:  # another container's process, or gone
        return "?"


def _nvml_details(nvml: Any, handle: Any) -> tuple[int, int, Optional[int], list[GPUProcess]]:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        utilization: Optional[int] = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except nvml.NVMLError:
        utilization = None
    processes = []
    for getter in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            for p in getter(handle):
                processes.append(GPUProcess(p.pid, _process_name(p.pid), p.usedGpuMemory))
        except nvml.NVMLError:
            pass
    return int(memory.total), int(memory.free), utilization, processes


@cache
def _torch_build() -> dict[str, Optional[str]]:
    """torch.version's `__version__`, `cuda` and `hip`: read from torch/version.py (plain assignments) while torch
    is not imported, else — or when that file cannot be read — from torch itself."""
    if "torch" not in sys.modules:
        try:
            folder = list(importlib.util.find_spec("torch").submodule_search_locations)[0]
            tree = ast.parse(Path(folder, "version.py").read_text(encoding="utf-8"))
            values = {target.id: node.value.value for node in tree.body
                      if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant)
                      for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                      if isinstance(target, ast.Name)}
            return {name: values[name] for name in ("__version__", "cuda", "hip")}
        except (AttributeError, TypeError, IndexError, KeyError, OSError, SyntaxError):
            pass
    import torch

    return {"__version__": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip}


def _torch_could_see_gpus(nvml: Any) -> bool:
    """False when torch.cuda certainly sees nothing: a CPU-only build, or a CUDA build and no NVIDIA driver (NVML
    comes with the driver, and CUDA cannot run without it)."""
    build = _torch_build()
    if build["hip"]:
        return True
    return bool(build["cuda"]) and (nvml is not None or importlib.util.find_spec("pynvml") is None)


def _torch_cuda_available(nvml: Any) -> bool:
    if not _torch_could_see_gpus(nvml):
        return False
    import torch

    return torch.cuda.is_available()


def detect() -> list[GPU]:
    """Every GPU this process can use, in torch's numbering; [] when there is none."""
    nvml = _nvml()
    if _torch_cuda_available(nvml):
        import torch

        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            handle = _nvml_handle(nvml, props)
            if handle is not None:
                total, free, utilization, processes = _nvml_details(nvml, handle)
            else:
                free, total = torch.cuda.mem_get_info(i)
                utilization, processes = None, []
            gpus.append(GPU(i, props.name, total, free, utilization, processes))
        return gpus
    if nvml is None:
        return []
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    return [GPU(i, _decode(nvml.nvmlDeviceGetName(h)), *_nvml_details(nvml, h)) for i, h in enumerate(handles)]


def _nvml_handle(nvml: Any, props: Any) -> Any:
    """NVML's handle for the device torch numbers `props` (matched by UUID: the two numberings can differ)."""
    if nvml is None:
        return None
    try:
        uuid = str(props.uuid)
        return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except (AttributeError, nvml.NVMLError):
        return None


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def why_none() -> str:
    """Why no GPU was found, in words a user can act on."""
    build = _torch_build()
    reasons = []
    if build["cuda"] is None and build["hip"] is None:
        reasons.append(f"torch {build['__version__']} is a CPU-only build")
    elif not _torch_cuda_available(_nvml()):
        reasons.append("torch sees no CUDA device")
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        reasons.append("CUDA_VISIBLE_DEVICES is empty")
    if _nvml() is None:
        reasons.append("no NVIDIA driver answered (NVML)")
    return "; ".join(reasons) or "no device reported"


def fits_on(peak_bytes: int) -> list[str]:
    """Known cards whose memory holds `peak_bytes` per GPU, smallest first."""
    return [name for name, gib in sorted(KNOWN_GPUS.items(), key=lambda kv: kv[1]) if gib * GiB >= peak_bytes]


def format_gpus(gpus: list[GPU]) -> RenderableType:
    """A gpustat-like table: index, name, memory used/total, utilisation, processes."""
    if not gpus:
        return Text(f"no NVIDIA GPU found ({why_none()})")
    table = Table(header_style="bold", show_edge=False)
    for column in ("#", "name", "memory used / total", "util", "processes"):
        table.add_column(column)
    for g in gpus:
        share = g.used_bytes / g.total_bytes if g.total_bytes else 0.0
        style = "red" if share > 0.9 else "yellow" if share > 0.5 else "green"
        procs = ", ".join(f"{p.name}/{p.pid}" + (f" ({p.used_bytes / GiB:.1f}G)" if p.used_bytes else "")
                          for p in g.processes) or "-"
        table.add_row(str(g.index), g.name,
                      Text(f"{g.used_bytes / GiB:5.1f} / {g.total_bytes / GiB:.1f} GiB", style=style),
                      "-" if g.utilization is None else f"{g.utilization}%", procs)
    return table


def watch(interval: float, console: Console) -> None:
    """Refresh the table every `interval` seconds until Ctrl-C, like `gpustat -i`. With no GPU there is nothing to
    watch: it says so once and returns, as plain `finetune gpus` does. Into a pipe or a log (no terminal to redraw
    in) each refresh is printed below the last, like `nvidia-smi -l`, instead of nothing until Ctrl-C."""
    from rich.live import Live

    gpus = detect()
    if not gpus:
        console.print(format_gpus(gpus))
        return
    try:
        if not console.is_terminal:
            while True:
                console.print(format_gpus(gpus))
                time.sleep(interval)
                gpus = detect()
        with Live(format_gpus(gpus), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(format_gpus(detect()), refresh=True)
    except KeyboardInterrupt:
        pass
