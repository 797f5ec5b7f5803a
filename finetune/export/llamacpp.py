"""The pinned llama.cpp toolchain: its converter scripts (from the llama-cpp-python sdist) and its built bindings.

Why the sdist: llama-cpp-python ships llama.cpp's own `convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, the
`conversion/` model classes and a `gguf-py` newer than the registry's `gguf` package (which fails on them), all at
the exact commit its bindings were built from. One pinned version, checked by sha256, cached under
$FINETUNE_CACHE/llama.cpp/<version>/.

Why a portable build (`-DGGML_NATIVE=OFF`): a `-march=native` build crashes on every quantized GGUF on VMs that
report AMX but fault on its instructions (ggml's AMX matmul segfaults in llama_decode at its `ldtilecfg`); turning
the GGML_AMX_* options off does not help, because with GGML_NATIVE=ON ggml's CMakeLists adds only -march=native and
ignores them. The wheel is built once into a cache directory keyed by version and flags, because pip's own wheel
cache ignores CMAKE_ARGS and would silently reuse a native build.

    python -m finetune.export.llamacpp setup     # fetch + check the sdist, build the wheel once, install it
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from finetune import atomic
from finetune.errors import UserError

VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CMAKE_ARGS = "-DGGML_NATIVE=OFF"
SETUP_COMMAND = "python -m finetune.export.llamacpp setup"
_VENDORED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


@dataclass(frozen=True)
class Toolchain:
    """Where llama.cpp's converter lives; run its scripts with `env()` so they import the vendored gguf-py."""

    root: Path  # vendor/llama.cpp subset: the scripts, conversion/, gguf-py/

    @property
    def convert_hf(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def convert_lora(self) -> Path:
        return self.root / "convert_lora_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"

    def env(self) -> dict[str, str]:
        """Environment for a converter subprocess: the vendored gguf-py and conversion/ first on the path."""
        env = dict(os.environ)
        env.pop("NO_LOCAL_GGUF", None)
        paths = [str(self.gguf_py), str(self.root), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return env


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", "~/.cache/finetune")).expanduser() / "llama.cpp" / VERSION


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_sdist() -> Path:
    """The pinned sdist in the cache, downloaded with pip when missing, always checked against its sha256."""
    sdist = cache_dir() / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        sdist.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=sdist.parent, prefix=".tmp-download-") as tmp:
            # pip prepares an sdist's metadata even to download it, so it needs the build backend: with build
            # isolation (pip's default) it installs scikit-build-core's wheel into a throwaway env, which works on a
            # machine that has never built anything (`--no-build-isolation` would need it installed already).
            # `--no-binary` names only our package: `:all:` would also build every build dependency from source.
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                   "-d", tmp, f"llama-cpp-python=={VERSION}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            got = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if done.returncode != 0 or not got:
                raise UserError(f"could not download llama-cpp-python=={VERSION} from the package registry "
                                f"(pip said: {done.stderr.strip()[-300:]}); put the sdist at {sdist} by hand")
            os.replace(got[0], sdist)
    actual = _sha256(sdist)
    if actual != SDIST_SHA256:
        raise UserError(f"{sdist}: sha256 {actual} is not the pinned {SDIST_SHA256}; delete the file and run "
                        f"`{SETUP_COMMAND}` again")
    return sdist


def ensure_toolchain() -> Toolchain:
    """The converter scripts, extracted from the checked sdist once (atomically) and reused after that."""
    root = cache_dir() / "vendor"
    if not (root / "convert_hf_to_gguf.py").is_file():
        sdist = ensure_sdist()
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar, atomic.directory(root, replace=True) as tmp:
            for member in tar.getmembers():
                rel = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                if (member.isfile() and rel
                        and any(rel == v or (v.endswith("/") and rel.startswith(v)) for v in _VENDORED)):
                    member.name = rel
                    tar.extract(member, tmp, filter="data")
    return Toolchain(root)


def require_llama_cpp():
    """The llama_cpp bindings, or one clear error saying how to get the right build."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise UserError(f"llama-cpp-python is not installed ({exc}); run `{SETUP_COMMAND}` once (it builds the "
                        f"pinned {VERSION} portably, 4–8 min on 2 cores, and caches the wheel)") from exc
    if llama_cpp.__version__ != VERSION:
        raise UserError(f"llama-cpp-python {llama_cpp.__version__} is installed, the toolkit is pinned to {VERSION}; "
                        f"run `{SETUP_COMMAND}`")
    return llama_cpp


@contextmanager
def native_notes_silenced() -> Iterator[None]:
    """llama.cpp writes per-tensor notes straight to file descriptor 2 when a LoRA GGUF is applied ("lora for
    'blk.N.ffn_down.weight' cannot use buft 'CPU_REPACK', fallback to CPU": the adapter's layers run unrepacked, as
    intended), past `verbose=False`. A failure still raises in Python with its own message."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def wheel_dir() -> Path:
    """The wheel cache, keyed by version and build flags (pip's own cache ignores CMAKE_ARGS)."""
    flags = re.sub(r"[^A-Za-z0-9]+", "_", CMAKE_ARGS).strip("_")
    return cache_dir() / f"wheel-{flags}"


def build_wheel() -> Path:
    """Build the portable wheel into the keyed cache unless it is already there."""
    target = wheel_dir()
    wheels = sorted(target.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    if wheels:
        return wheels[0]
    sdist = ensure_sdist()
    print(f"building llama-cpp-python {VERSION} ({CMAKE_ARGS}); this takes 4–8 min on 2 cores, once", file=sys.stderr)
    with atomic.directory(target, replace=True) as tmp, tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        # the compiler's scratch files live in our cache: a /tmp cleaner mid-build fails it ("can't open ccX.s")
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "TMPDIR": scratch}
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(tmp), str(sdist)]
        if subprocess.run(cmd, env=env).returncode != 0:
            raise UserError(f"building llama-cpp-python {VERSION} failed (see pip's output above); it needs a C++ "
                            f"compiler and cmake (`apt-get install -y build-essential cmake`)")
    return sorted(target.glob(f"llama_cpp_python-{VERSION}-*.whl"))[0]


def _installed_from() -> str | None:
    """The file URL pip recorded when llama-cpp-python was installed, None when it is not installed."""
    try:
        dist = metadata.distribution("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None
    direct = dist.read_text("direct_url.json")
    return json.loads(direct).get("url", "") if direct else ""


def setup() -> Path:
    """Make sure the portable wheel is built and is the one installed; returns the wheel."""
    wheel = build_wheel()
    installed, pip = _installed_from(), [sys.executable, "-m", "pip"]
    if installed not in (None, wheel.resolve().as_uri()):  # another build (pip's own, maybe -march=native)
        subprocess.run([*pip, "uninstall", "-y", "llama-cpp-python"], check=True)
    if subprocess.run([*pip, "install", str(wheel)]).returncode != 0:  # also completes missing dependencies
        raise UserError(f"pip could not install {wheel}")
    ensure_toolchain()
    return wheel


if __name__ == "__main__":
    if sys.argv[1:] != ["setup"]:
        sys.exit(f"usage: {SETUP_COMMAND}")
    try:
        print(f"llama-cpp-python {VERSION} ready: {setup()}")
    except UserError as exc:
        sys.exit(str(exc))
