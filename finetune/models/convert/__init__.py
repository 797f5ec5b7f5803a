"""Original (remote-code) checkpoints -> native transformers checkpoints, once, cached by content.

`convert_checkpoint` is what `finetune convert SRC DST` and the model resolver call: it reads SRC/config.json,
picks the family's converter (chatglm3.py, baichuan2.py, qwen1.py) and, without DST, converts into
$FINETUNE_CACHE/converted/<family>-<content hash>/ unless a complete conversion of the same files is already there.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

from finetune import atomic
from finetune.errors import UserError
from finetune.models import native
from finetune.models.convert import common

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """$FINETUNE_CACHE, default ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_CACHE") or "~/.cache/finetune").expanduser()


def code_hash(*modules: str) -> str:
    """Hash of our own converter sources: a fixed converter must not reuse what a buggy one wrote."""
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()


def content_hash(src: Path, family: str) -> str:
    """config.json bytes + each weight and tokenizer file's name, size and mtime + the converter's code."""
    h = hashlib.sha256((src / "config.json").read_bytes())
    for path in sorted(p for p in src.iterdir() if p.is_file() and p.name != "config.json"):
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(code_hash(__name__, common.__name__, f"{__name__}.{family}",
                       "finetune.models.baichuan_alibi").encode())
    return h.hexdigest()[:16]


def convert_checkpoint(src_dir: Path, dst_dir: Optional[Path] = None, *, progress: bool = True) -> Path:
    """Convert the original checkpoint in `src_dir`; return the native checkpoint's directory."""
    src = Path(src_dir).expanduser()
    original = common.read_config(src)
    family = native.detect_original_family(original)
    if family is None:
        raise UserError(f"{src}: model_type {original.get('model_type')!r} already loads natively in "
                        f"transformers; nothing to convert")
    module = native.converter(family)
    if dst_dir is not None:
        summary = module.convert(src, Path(dst_dir).expanduser(), progress=progress)
        log.debug("converted %s", json.dumps(summary))
        return Path(summary["dst"])
    dst = cache_root() / "converted" / f"{family}-{content_hash(src, family)}"
    if (dst / "config.json").is_file():
        log.info("reusing converted checkpoint %s", dst)
        return dst

    def build(path: Path) -> None:
        log.debug("converted %s", json.dumps(module.convert(src, path, progress=progress)))

    return atomic.build_once(dst, build, marker="config.json")
