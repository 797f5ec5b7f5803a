"""What a page user may do: the page can be reached by others (host=, a tunnel, a shared machine), so everything
typed into it is input from someone who may not be the machine's owner.

- Settings: only recipe keys from an allow-list. Left out: keys that run code (`reward.fn=module:function` imports
  and calls it), replace or reuse runs (`overwrite`, `resume`, `output_dir`: the page has its own fields, confined
  to its outputs folder), name files (`name`), and `${...}` interpolations anywhere (OmegaConf resolves
  `${oc.env:HF_TOKEN}` into the YAML the page shows). Of the command's flags only `--force` (start although the
  estimate says it will not fit).
- Paths: a run the page opens, resumes, exports or creates lies inside its outputs folder; file names it writes
  come from `safe_name`.
- Secrets: any text the page shows passes through `redact`, which hides the values of secret-looking environment
  variables (tokens, keys, passwords) wherever they appear.
- Sign-in: `credentials` reads `user:password` lines from auth_file= or $FINETUNE_WEB_AUTH (never from the
  command line, where `ps` and the shell history would show them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from finetune import config
from finetune.errors import UserError

DENIED = ("name", "output_dir", "overwrite", "resume", "reward.fn")
FLAGS = ("--force",)
OPEN_SECTIONS = ("data.columns",)
"""Sections whose keys are the user's own names (`data.columns.instruction=prompt`)."""
DOTTED = re.compile(r"[A-Za-z_]\w*(\.\w+)*")
"""A key as the schema spells them; anything else (`reward[fn]`, quotes) is refused rather than left to OmegaConf's
own reading of it. A plain key outside the schema goes on to the recipe check, which names the closest keys."""
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|AUTH|CREDENTIAL", re.I)
AUTH_ENV = "FINETUNE_WEB_AUTH"


def allowed_keys() -> set[str]:
    every = config.schema_keys()
    leaves = {k for k in every if not any(other.startswith(f"{k}.") for other in every)}
    return leaves - set(DENIED) - set(OPEN_SECTIONS)


def check_settings(items: list[str], flags: list[str]) -> None:
    """UserError for the first setting or flag a page user may not give."""
    allowed = allowed_keys()
    for item in items:
        key, _, value = item.partition("=")
        if "${" in value or "${" in key:
            raise UserError(f"more settings: '{item}': interpolations (${{...}}) are not accepted on this page; "
                            f"type the value itself")
        open_key = any(key.startswith(f"{s}.") and re.fullmatch(r"\w+", key[len(s) + 1:]) for s in OPEN_SECTIONS)
        if key in DENIED:
            raise UserError(f"more settings: '{key}' cannot be set on this page"
                            f"{' (it runs code of your choosing: use the command line)' if key == 'reward.fn' else ''}"
                            f"{'; use the run directory field' if key == 'output_dir' else ''}")
        if key not in allowed and not open_key and (key in config.schema_keys() or not DOTTED.fullmatch(key)):
            raise UserError(f"more settings: '{key}' is not a recipe key a page user may set; "
                            f"`finetune recipe=NAME --print-config` lists the keys")
    for flag in flags:
        if flag not in FLAGS:
            raise UserError(f"more settings: the flag '{flag}' is not accepted on this page (only "
                            f"{', '.join(FLAGS)})")


def safe_name(name: str) -> str:
    """A file name from free text: letters, digits, `_`, `-` and `.` only, never `..` or a leading dot."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).replace("..", "_").lstrip(".") or "recipe"


def inside(outputs: str | Path, path: str | Path) -> Path:
    """`path` (absolute, or relative to the outputs folder) resolved, or UserError when it leads out of it."""
    root = Path(outputs).expanduser().resolve()
    given = Path(path).expanduser()
    resolved = (given if given.is_absolute() else root / given).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise UserError(f"{path}: the page works only with runs inside its outputs folder {root}")
    return resolved


def redact(text: str) -> str:
    """`text` with the value of every secret-looking environment variable replaced by `<$NAME>`."""
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 6 and value in text:
            text = text.replace(value, f"<${name}>")
    return text


def credentials(auth_file: Optional[str]) -> list[tuple[str, str]]:
    """(user, password) pairs from auth_file= (one `user:password` a line; `#` comments) or $FINETUNE_WEB_AUTH."""
    if auth_file:
        path = Path(auth_file).expanduser()
        if not path.is_file():
            raise UserError(f"auth_file={auth_file}: no such file (one user:password a line)")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        where = f"auth_file={auth_file}"
    else:
        lines, where = [os.environ.get(AUTH_ENV, "").strip()], f"${AUTH_ENV}"
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise UserError(f"{where} line {number}: expected user:password")
        pairs.append((user, password))
    if auth_file and not pairs:
        raise UserError(f"auth_file={auth_file}: no user:password line in it")
    return pairs
