"""Small JSON results cached on disk: $FINETUNE_CACHE/<kind>/<name>-<key>.json (default ~/.cache/finetune).

For answers that are slow to compute and depend only on things we can name — a model's exact parameter facts (the
config, the method and its settings, the library versions, our code), the shipped recipes' contents. The key is a
hash of all of them, so a change is a new entry, never a stale answer. An entry is written atomically and read
defensively: an unreadable, partial or foreign file counts as missing and is computed and written again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from finetune import atomic


def root(kind: str) -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or "~/.cache/finetune").expanduser() / kind


def key(*parts: Any) -> str:
    """An entry's key: a hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def files_digest(paths: Iterable[Path]) -> str:
    """A hash of files' names and contents: what a cached answer derived from them depends on."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path}\0{path.stat().st_size}\0".encode() + path.read_bytes())
    return h.hexdigest()


def _path(kind: str, name: str, entry: str) -> Path:
    return root(kind) / f"{name}-{entry}.json"


def load(kind: str, name: str, entry: str) -> Optional[Any]:
    """The stored value, or None when there is no readable entry for exactly this key."""
    try:
        stored = json.loads(_path(kind, name, entry).read_text(encoding="utf-8"))
        return stored["value"] if stored.get("key") == entry else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def store(kind: str, name: str, entry: str, value: Any) -> None:
    """Write the entry whole or not at all; a cache that cannot be written only costs the next run its time."""
    try:
        atomic.write_text(_path(kind, name, entry), json.dumps({"key": entry, "value": value}) + "\n")
    except OSError:
        pass
