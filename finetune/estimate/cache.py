"""Small JSON results cached on disk: $FINETUNE_CACHE/<kind>/<name>-<key>.json (default ~/.cache/finetune).

For answers that are slow to compute and depend only on things we can name — a model's exact parameter facts (the
config, the method and its settings, the library versions, our code), the shipped recipes' contents. The key is a
hash of all of them, so a change is a new entry, never a stale answer. An entry is written atomically and read
defensively: an unreadable, partial or foreign file counts as missing and is computed and written again. A kind may
also ship a read-only seed of entries inside the package, made by the same code: the same key is the same answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finetune import atomic


def root(kind: str) -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or "~/.cache/finetune").expanduser() / kind


def key(*parts: Any) -> str:
    """An entry's key: a hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def files_digest(paths: Iterable[Path], relative_to: Path | None = None) -> str:
    """A hash of files' names and contents: what a cached answer derived from them depends on. With `relative_to`,
    names are taken relative to it, so the same files give the same hash wherever they are installed."""
    h = hashlib.sha256()
    for path in paths:
        name = path.relative_to(relative_to).as_posix() if relative_to else path
        h.update(f"{name}\0{path.stat().st_size}\0".encode() + path.read_bytes())
    return h.hexdigest()


def _path(kind: str, name: str, entry: str) -> Path:
    return root(kind) / f"{name}-{entry}.json"


def load(kind: str, name: str, entry: str, *, seed: Path | None = None) -> Any | None:
    """The stored value, or None when there is no readable entry for exactly this key: from the user's cache, else
    from `seed`, a directory of entries shipped with the package (named and keyed as the cache's, never written)."""
    for path in (_path(kind, name, entry), *([seed / f"{name}-{entry}.json"] if seed else [])):
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("key") == entry:
                return stored["value"]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
    return None


def store(kind: str, name: str, entry: str, value: Any) -> None:
    """Write the entry whole or not at all; a cache that cannot be written only costs the next run its time."""
    try:
        atomic.write_text(_path(kind, name, entry), json.dumps({"key": entry, "value": value}) + "\n")
    except OSError:
        pass
