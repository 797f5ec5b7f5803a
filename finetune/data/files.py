"""One data source read as raw rows: the local files a path names (file, directory, glob) or a hub dataset, each
file through `datasets` — and, when the JSON loader fails (its errors name no line), every line that broke it.
Those lines are left out of a cleaned copy in the cache (the user's files are never written) and returned, so that
load.py counts them with the records the formats refuse, and `on_bad_record` decides for all of them at once.
Rows keep their number in the user's file (`original_row`); `places` names rows the way a person finds them in
that file type (lines, rows or records).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import itertools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import datasets
from datasets import Dataset, Features, Value

from finetune.data.turns import MAX_DEPTH, kind
from finetune.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_LINE_BYTES = 64 * 2**20
"""Longest JSON Lines record: tens of millions of tokens, far past any model's context; a longer line is a file
that is not JSON Lines (or a mistake), and reading it would hold it whole in memory, several times over."""
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')


def cache_dir(kind: str = "datasets") -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", "~/.cache/finetune")).expanduser() / kind


def resolve(path: str, where: str) -> Optional[list[Path]]:
    """The local files a data path names (a file, a directory, a glob), or None for a hub dataset id."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        if candidate.suffix not in BUILDERS:
            raise UserError(f"{where}: {path}: unsupported file type '{candidate.suffix}'; "
                            f"use one of {', '.join(BUILDERS)}")
        return [candidate]
    if candidate.is_dir():
        files = sorted(p for p in candidate.rglob("*") if p.is_file() and p.suffix in BUILDERS)
        if not files:
            raise UserError(f"{where}: directory {path} holds no {'/'.join(BUILDERS)} files")
        return files
    if glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(path), recursive=True)
                       if Path(p).is_file() and Path(p).suffix in BUILDERS)
        if not files:
            raise UserError(f"{where}: no {'/'.join(BUILDERS)} file matches {path}")
        return files
    if HUB_ID.match(path) and candidate.suffix not in BUILDERS:
        return None
    raise UserError(f"{where}: file {path} does not exist")


Unreadable = list[tuple[int, str, str]]
"""(row, reason, problem) of each record `datasets` cannot load; `row` counts records (non-blank lines) from 0."""


def scan_json(path: Path) -> Unreadable:
    """The records of a JSON Lines file that `datasets` cannot load as one row each."""
    problems: Unreadable = []
    first_seen: dict[str, tuple[str, int]] = {}
    with path.open(encoding="utf-8", errors="replace") as handle:
        row = -1
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append((row, "malformed_json", f"not valid JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(record, dict):
                problems.append((row, "malformed_json", f"a record must be a JSON object {{...}}, got {kind(record)}"))
                continue
            for key, value in record.items():
                if value is None:
                    continue
                seen = first_seen.setdefault(key, (kind(value), number))
                if seen[0] != kind(value):
                    problems.append((row, "bad_type", f"'{key}' is {kind(value)} here but {seen[0]} on line {seen[1]}"))
                    break
    return problems


def check_json_shape(path: Path) -> None:
    """UserError naming the line where a JSON or JSON Lines file nests deeper than MAX_DEPTH, or where a JSON Lines
    record is longer than MAX_LINE_BYTES: found before any parser sees it, since the parsers crash on them."""
    with path.open("rb") as handle:
        lines = iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b"")
        first = next(lines, b"")
        array = first.lstrip().startswith(b"[")  # one JSON array (read whole by Python's json): no line limit
        depth, number = 0, 1
        for chunk in itertools.chain([first], lines):
            if len(chunk) > MAX_LINE_BYTES and not array:
                raise UserError(f"{path} line {number}: longer than {MAX_LINE_BYTES // 2**20} MiB; a JSON Lines "
                                f"file holds one record per line")
            structure = _STRING.sub(b"", chunk)
            if depth + structure.count(b"[") + structure.count(b"{") > MAX_DEPTH:
                for char in structure:
                    depth += (char in b"[{") - (char in b"]}")
                    if depth > MAX_DEPTH:
                        raise UserError(f"{path} line {number}: nested more than {MAX_DEPTH} levels deep; no chat "
                                        f"or instruction record needs that (is it the right file?)")
            else:
                depth += structure.count(b"[") + structure.count(b"{") - structure.count(b"]") - structure.count(b"}")
            number += chunk.endswith(b"\n")
            depth = depth if array else 0


def _json_array_problem(path: Path) -> Optional[str]:
    """For a .json file holding one array: where it stops being valid JSON (None if it is JSON Lines or valid)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.lstrip().startswith("["):
        return None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is None:
        return None
    return f"record {bad + 1}: a record must be a JSON object {{...}}, got {kind(records[bad])}"


def _cleaned_copy(path: Path, bad_rows: set[int]) -> Path:
    """A copy of a JSON Lines file without its unreadable records, in the cache (the user's file stays untouched)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir("cleaned") / f"{path.stem}-{key}.jsonl"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        with path.open(encoding="utf-8", errors="replace") as src, tmp.open("w", encoding="utf-8") as dst:
            row = -1
            for line in src:
                row += bool(line.strip())
                if not (line.strip() and row in bad_rows):
                    dst.write(line)
        os.replace(tmp, target)
    return target


def _csv_as_text(path: Path) -> dict[str, Any]:
    """CSV cells stay text ("42" is an answer, not a number) and empty cells stay empty strings."""
    with path.open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), [])
    return {"features": Features({name: Value("string") for name in header}), "keep_default_na": False}


def _load(builder: str, path: Path) -> Dataset:
    kwargs = _csv_as_text(path) if builder == "csv" else {}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # the JSON loader logs an unhelpful message first
    try:
        return datasets.load_dataset(builder, data_files=[str(path)], split="train",
                                     cache_dir=str(cache_dir()), **kwargs)
    finally:
        datasets.logging.set_verbosity(verbosity)


def read_file(path: Path) -> tuple[Dataset, Unreadable]:
    """One local file as a raw dataset, and the records left out of it because `datasets` cannot read them."""
    builder = BUILDERS[path.suffix]
    if builder == "json":
        check_json_shape(path)
    try:
        return _load(builder, path), []
    except Exception as exc:  # datasets wraps the parser's error; find the line ourselves
        if builder != "json":
            raise UserError(f"{path}: cannot be read as {path.suffix[1:]}: {exc.__cause__ or exc}") from None
        problem = _json_array_problem(path)
        if problem:
            raise UserError(f"{path} {problem}") from None
        problems = scan_json(path)
        if not problems:
            raise UserError(f"{path}: cannot be read: {exc.__cause__ or exc}") from None
        with path.open(encoding="utf-8", errors="replace") as handle:
            if len(problems) == sum(1 for line in handle if line.strip()):
                return Dataset.from_dict({}), problems  # `datasets` refuses a file without records
        return _load(builder, _cleaned_copy(path, {row for row, _, _ in problems})), problems


def read_hub(name: str, where: str) -> Dataset:
    try:
        return datasets.load_dataset(name, split="train", cache_dir=str(cache_dir()))
    except Exception as exc:
        raise UserError(f"{where}: '{name}' is not a local path, and loading it as a hub dataset failed "
                        f"({str(exc).splitlines()[0]}); check the path, or the network for hub datasets") from None


def original_row(row: int, skipped: Sequence[int]) -> int:
    """The number in the user's file of row `row` of its cleaned copy, which left out the rows `skipped` (sorted)."""
    for left_out in skipped:
        if left_out > row:
            break
        row += 1
    return row


def places(src: str, rows: list[int]) -> tuple[str, list[int]]:
    """Where rows `rows` (0-based) of source `src` are, in the words a person uses for that file type: ("line",
    line numbers) for JSON Lines, ("row", numbers) for CSV and Parquet, else ("record", numbers), counted from 1."""
    path = Path(src)
    if path.suffix == ".jsonl" or (path.suffix == ".json" and path.is_file()
                                   and not path.read_text(encoding="utf-8", errors="replace").lstrip().startswith("[")):
        lines: dict[int, int] = {}
        wanted, seen = set(rows), -1
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                seen += bool(line.strip())
                if line.strip() and seen in wanted:
                    lines[seen] = number
        return "line", [lines.get(row, row + 1) for row in rows]
    return "row" if path.suffix in (".csv", ".parquet") else "record", [row + 1 for row in rows]
