"""A dataset registry in LLaMA-Factory's `dataset_info.json` layout, so a user's LLaMA-Factory data folder works
unchanged: `data.name=alpaca_zh_demo data.dir=DIR` (several names: `data.name=a,b`) reads the entries from
DIR/dataset_info.json and loads each like a data.path source.

An entry's keys, as LLaMA-Factory reads them: `file_name` (a file or folder in DIR) or `hf_hub_url` (a hub
dataset, preferred when both are given), `formatting` (alpaca, the default, or sharegpt), `ranking` (preference
data), `columns` (LLaMA-Factory's names: prompt, query, response, history, messages, system, tools, chosen,
rejected, kto_tag), `tags` (sharegpt: role_tag, content_tag and the role names user_tag, assistant_tag,
observation_tag, function_tag, system_tag) and `num_samples` (that many examples, a seeded sample, repeated when
the file has fewer). Hub subsets, folders and splits, other hubs, loading scripts and media columns are refused
with a message rather than ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from finetune.data.files import HUB_ID
from finetune.data.turns import CALL, MAX_DEPTH, nests_deeper
from finetune.errors import UserError, did_you_mean

INFO = "dataset_info.json"
COLUMNS = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                      "system": "system", "tools": "tools", "chosen": "chosen", "rejected": "rejected",
                      "kto_tag": "label"},
           "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools", "chosen": "chosen",
                        "rejected": "rejected", "kto_tag": "label"}}
"""LLaMA-Factory's column keys → our field names (formats.FORMATS), per formatting."""
DEFAULT_COLUMNS = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
                   "sharegpt": {"messages": "conversations"}}
"""The columns LLaMA-Factory reads when an entry does not name them."""
TAGS = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool", "function_tag": CALL,
        "system_tag": "system"}
MEDIA = ("images", "videos", "audios")


@dataclass(frozen=True)
class Entry:
    """One registry entry as a data source: what load.load_source needs."""

    name: str
    path: str  # a file or folder path, or a hub dataset id
    format: str
    columns: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # role names of this data → ours (its tags)
    num_samples: Optional[int] = None


def read(directory: str) -> dict[str, dict[str, Any]]:
    """The entries of DIR/dataset_info.json."""
    path = Path(directory).expanduser() / INFO
    if not path.is_file():
        raise UserError(f"data.dir={directory}: no {INFO} there; data.name= reads a LLaMA-Factory-style registry "
                        "(its data/ folder), data.path= reads files directly")
    too_deep = UserError(f"{path}: nested more than {MAX_DEPTH} levels deep; a registry maps each dataset name to "
                         "a few settings (is it the right file?)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except ValueError as exc:  # not UTF-8, or an integer past Python's 4300 digits
        raise UserError(f"{path}: not readable as JSON ({exc})") from None
    except RecursionError:  # deeper than the parser's stack
        raise too_deep from None
    if nests_deeper(info, MAX_DEPTH):  # anything printing or walking it later would recurse
        raise too_deep
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise UserError(f"{path}: must map each dataset name to an object of settings")
    return info


def _format(info: dict[str, Any], where: str) -> str:
    """Our format for the entry (formats.FORMATS)."""
    formatting = info.get("formatting", "alpaca")
    if formatting not in COLUMNS:
        raise UserError(f"{where}: formatting '{formatting}' is not one of alpaca, sharegpt"
                        f"{did_you_mean(str(formatting), COLUMNS)}")
    if info.get("ranking"):
        return f"{formatting}_preference"
    return "kto" if "kto_tag" in info.get("columns", {}) else formatting


def _columns(info: dict[str, Any], formatting: str, where: str) -> dict[str, str]:
    """Our data.columns for the entry: each LLaMA-Factory column key mapped to our field."""
    given = {**DEFAULT_COLUMNS[formatting], **info.get("columns", {})}
    unknown = sorted(set(given) - set(COLUMNS[formatting]) - set(MEDIA))
    if unknown:
        raise UserError(f"{where}: unknown column key '{unknown[0]}' for {formatting}"
                        f"{did_you_mean(unknown[0], COLUMNS[formatting])}")
    return {COLUMNS[formatting][key]: column for key, column in given.items() if key in COLUMNS[formatting]}


def _tags(info: dict[str, Any], where: str) -> tuple[dict[str, str], dict[str, str]]:
    """(turn keys for data.columns.role/content, role names → ours) from the entry's tags."""
    tags = info.get("tags", {})
    unknown = sorted(set(tags) - set(TAGS) - {"role_tag", "content_tag"})
    if unknown:
        raise UserError(f"{where}: unknown tag '{unknown[0]}'{did_you_mean(unknown[0], [*TAGS, 'role_tag'])}")
    keys = {ours: tags[tag] for tag, ours in (("role_tag", "role"), ("content_tag", "content")) if tag in tags}
    return keys, {tags[tag]: ours for tag, ours in TAGS.items() if tag in tags}


def _path(directory: str, info: dict[str, Any], where: str) -> str:
    """The entry's data: a hub id that names nothing on this disk, or a file or folder inside DIR. A registry is a
    file others write (a downloaded data folder), so it never reaches elsewhere: no absolute path, no `..`, no
    symlink out, no hub id that is really a local directory (the loader tries a local path first)."""
    if info.get("hf_hub_url"):
        hub = str(info["hf_hub_url"])
        if not HUB_ID.match(hub) or Path(hub).expanduser().exists():
            raise UserError(f"{where}: hf_hub_url '{hub}' is not a hub dataset id (org/name); local data is named "
                            "with file_name, inside the data folder")
        return hub
    if not info.get("file_name"):
        raise UserError(f"{where}: has neither file_name nor hf_hub_url (other hubs and loading scripts are not "
                        "read here: download the data and name it with file_name)")
    root = Path(directory).expanduser().resolve()
    target = (root / str(info["file_name"])).resolve()
    if not target.is_relative_to(root) or target == root:
        raise UserError(f"{where}: file_name '{info['file_name']}' leads outside {root}; a registry names files "
                        "inside its own folder")
    return str(target)


def entry(directory: str, name: str) -> Entry:
    """The entry `name` of DIR/dataset_info.json, as a data source."""
    info_all = read(directory)
    if name not in info_all:
        raise UserError(f"data.name={name}: no such dataset in {Path(directory) / INFO}"
                        f"{did_you_mean(name, info_all)}; `finetune data data.dir={directory}` lists them")
    info, where = info_all[name], f"{Path(directory) / INFO}: '{name}'"
    media = [key for key in MEDIA if info.get("columns", {}).get(key)]
    if media:
        raise UserError(f"{where}: has {media[0]}; the models trained here read text only")
    hub = [key for key in ("subset", "folder") if info.get(key) and info.get("hf_hub_url")]
    if hub or info.get("split", "train") != "train":
        raise UserError(f"{where}: '{(hub or ['split'])[0]}' is not supported; download the data (its train "
                        "split) and name it with file_name")
    fmt = _format(info, where)
    keys, roles = _tags(info, where)
    columns = _columns(info, info.get("formatting", "alpaca"), where)
    return Entry(name, _path(directory, info, where), fmt, {**columns, **keys}, roles, info.get("num_samples"))


def listing(directory: str) -> list[dict[str, Any]]:
    """One row per entry: name, source, format (ours), and whether a local file is there."""
    rows = []
    for name, info in read(directory).items():
        source = info.get("hf_hub_url") or info.get("file_name") or info.get("ms_hub_url") or "?"
        local = not info.get("hf_hub_url") and bool(info.get("file_name"))
        try:
            fmt = _format(info, name)
        except UserError:
            fmt = f"? ({info.get('formatting')})"
        rows.append({"name": name, "source": source, "format": fmt,
                     "found": (Path(directory).expanduser() / info["file_name"]).exists() if local else None})
    return rows


def render_listing(directory: str, rows: list[dict[str, Any]]) -> Any:
    """The listing as a rich table (stdout of `finetune data data.dir=DIR`)."""
    from rich.table import Table

    table = Table(title=f"{len(rows)} datasets in {Path(directory) / INFO} · use one with data.name=NAME")
    for column in ("name", "format", "source", "found"):
        table.add_column(column)
    for row in rows:
        found = "hub" if row["found"] is None else "yes" if row["found"] else "missing"
        table.add_row(row["name"], row["format"], row["source"], found)
    return table
