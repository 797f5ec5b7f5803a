"""Fetch the wheels the GPU machine's image lacks into `.gpu-wheels/` (git-ignored), so `scripts/gpu_check.sh` can
install them there without any network: that machine reaches nothing outside itself, and what it gets travels with
the working tree (64 MiB per call in all, working tree included).

The image has torch (CUDA 13.0), transformers 5.17, peft, accelerate, tokenizers, safetensors, pyarrow, pandas,
PyYAML, numpy, huggingface_hub, psutil, jinja2 and triton (with torch). It lacks trl, datasets, bitsandbytes,
omegaconf and liger-kernel; datasets in turn needs dill, multiprocess, xxhash and fsspec. Everything is pinned to the
versions the project resolves (transformers 5.17.x) and fetched with `pip download --no-deps` for CPython 3.12 on
manylinux x86_64 (the image's Python), through pip, the registry client a user already has.

bitsandbytes' manylinux wheel is 43.1 MB: it carries libraries for CUDA 11.8-13.2, ROCm and XPU. With `--trim`
(the default) it is rewritten with the CPU library and the CUDA 12.8/13.0/13.2 ones only (its RECORD rewritten to
match), which leaves room in the 64 MiB. Sizes seen on 2026-12-06:

    bitsandbytes-0.50.2 (manylinux_2_24)  43.14 MB full, 13.96 MB trimmed
    trl-1.16.0                             0.95 MB
    liger_kernel-0.8.5                     0.91 MB
    datasets-5.2.0                         0.61 MB
    xxhash-4.1.0 (cp312 manylinux)         0.47 MB
    omegaconf-2.4.0                        0.25 MB
    fsspec-2026.9.0                        0.22 MB
    multiprocess-0.70.19 (py312)           0.15 MB
    dill-0.4.1                             0.12 MB
    total                                 17.64 MB trimmed (46.8 MB untrimmed); the working tree is ~15 MiB

    .venv/bin/python scripts/fetch_gpu_wheels.py [--dest .gpu-wheels] [--no-trim]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEST = REPO / ".gpu-wheels"
PINS = ("trl==1.16.0", "datasets==5.2.0", "bitsandbytes==0.50.2", "omegaconf==2.4.0", "liger-kernel==0.8.5",
        "dill==0.4.1", "multiprocess==0.70.19", "xxhash==4.1.0", "fsspec==2026.9.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
KEEP_LIBS = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda128.so", "libbitsandbytes_cuda130.so",
             "libbitsandbytes_cuda132.so")
"""bitsandbytes picks its library by torch.version.cuda; the image's torch is cu130 (neighbours kept for safety)."""
BUDGET = 64 * 2**20


def download(dest: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--python-version", "3.12",
           "--implementation", "cp", *platforms, "--disable-pip-version-check", "-q", "-d", str(dest), *PINS]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pip download failed: {(done.stderr.strip().splitlines() or ['no reason'])[-1]}")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def trim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the wheel without the GPU libraries the image cannot load; RECORD lists exactly what stays."""
    dropped = lambda name: name.startswith("bitsandbytes/libbitsandbytes_") and Path(name).name not in KEEP_LIBS
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if not dropped(n)]
        if len(names) == len(src.namelist()):
            tmp.unlink()
            return  # already trimmed
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for name in names:
            if name != record:
                dst.writestr(src.getinfo(name), src.read(name))
        lines = [line for line in src.read(record).decode().splitlines() if not dropped(line.split(",")[0])]
        dst.writestr(record, "\n".join(lines) + "\n")
    tmp.replace(wheel)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--no-trim", action="store_true", help="keep bitsandbytes' every GPU library (43 MB)")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    download(args.dest)
    if not args.no_trim:
        for wheel in args.dest.glob("bitsandbytes-*.whl"):
            trim_bitsandbytes(wheel)
    total = 0
    for wheel in sorted(args.dest.glob("*.whl")):
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 1e6:7.2f} MB  {wheel.name}")
    print(f"{total / 1e6:7.2f} MB  total ({total / BUDGET:.0%} of the 64 MiB a device call carries, "
          "before the working tree)")
    return 0 if total < BUDGET else 1


if __name__ == "__main__":
    sys.exit(main())
