"""The user's data sources turned into the internal schema (formats.py), mixed and split.

Every file is loaded on its own (files.py) so each row keeps its origin (`_src`, `_row`): a bad record is then
reported as "data/x.jsonl line 7: 'output' is missing", not as "row 4711 of a concatenation". Bad records (lines
`datasets` cannot read, rows the formats mark bad) are dropped, counted and announced, or stop the run counting
them all and naming the first few (`settle`): a user learns the extent before choosing data.on_bad_record=skip
(LLaMA-Factory skips such records with a warning; its own demo files hold a few).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
from datasets import Dataset
from datasets.fingerprint import Hasher

from finetune.data import formats, registry
from finetune.data.files import original_row, places, read_file, read_hub, resolve
from finetune.data.kinds import NAMES, Kind
from finetune.errors import UserError

MIN_ROWS_PER_PROC = 2000  # below this, worker start-up costs more than it saves
CODE_FILES = ("formats.py", "turns.py", "files.py", "load.py", "kinds.py")
FEW = 5
"""Bad records a message lists by number; the rest are counted."""
log = logging.getLogger(__name__)


def code_hash(*files: Path) -> str:
    """Part of every fingerprint, so that editing the pipeline's code invalidates its cached results."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(*parts: Any) -> str:
    return Hasher.hash(parts)


def procs(num_proc: Optional[int], rows: int) -> Optional[int]:
    """num_proc for a map over `rows` rows: the recipe's value, but never workers with almost nothing to do."""
    if not num_proc or num_proc <= 1:
        return None
    useful = max(1, rows // MIN_ROWS_PER_PROC)
    return min(num_proc, useful) if useful > 1 else None


def column(ds: Dataset, name: str) -> list:
    return ds.with_format("arrow")[name].to_pylist()


Unread = tuple[str, int, str, str]
"""(source, row, reason, why) of a record left out before it became a row (files.Unreadable, with its source)."""


def settle(ds: Dataset, on_bad_record: str, *, policy: tuple[str, ...] = (), unreadable: Sequence[Unread] = (),
           verb: str = "malformed") -> tuple[Dataset, Counter]:
    """Drop the rows marked bad, counted by reason. Bad records (every marked row but the length-policy drops whose
    reasons are in `policy`, plus the `unreadable` ones) raise when data.on_bad_record=error, with every bad record
    of each source counted and the first few named; when skipped, the same count goes to the log (stderr)."""
    drops = column(ds, "_drop")
    counts = Counter(d for d in drops if d) + Counter(reason for _, _, reason, _ in unreadable)
    marked = [i for i, d in enumerate(drops) if d and d not in policy]
    if marked or unreadable:
        found = _bad_records(ds, marked, unreadable)
        totals = _totals(ds, unreadable)
        summaries = [_summary(src, rows, totals[src], verb) for src, rows in found.items()]
        bad, total = sum(map(len, found.values())), sum(totals[src] for src in found)
        if on_bad_record == "error":
            raise UserError(f"{'; '.join(summaries)}; fix {'it' if bad == 1 else 'them'}, or set "
                            f"data.on_bad_record=skip to train on the other {total - bad}")
        for summary in summaries:
            log.warning("%s; left out (data.on_bad_record=skip)", summary)
    if not counts:
        return ds, counts
    return ds.select([i for i, d in enumerate(drops) if not d]), counts


def _bad_records(ds: Dataset, marked: list[int], unreadable: Sequence[Unread]) -> dict[str, dict[int, str]]:
    """source → {row: why} for every bad record, in the order the sources come (a repeated row counts once)."""
    found: dict[str, dict[int, str]] = {}
    for src, row, _, why in unreadable:
        found.setdefault(src, {})[row] = why
    rows = ds.select(marked).select_columns(["_src", "_row", "_why"]).to_dict()
    for src, row, why in zip(rows["_src"], rows["_row"], rows["_why"]):
        found.setdefault(src, {}).setdefault(row, why)
    return {src: dict(sorted(bad.items())) for src, bad in found.items()}


def _totals(ds: Dataset, unreadable: Sequence[Unread]) -> Counter:
    """source → how many of its records there are here: its distinct rows in `ds`, plus those never read."""
    table = ds.select_columns(["_src", "_row"]).with_format("arrow")[:]
    counts = table.group_by("_src").aggregate([("_row", "count_distinct")]).to_pydict()
    return Counter(dict(zip(counts["_src"], counts["_row_count_distinct"]))) + Counter(s for s, *_ in unreadable)


def _summary(src: str, rows: dict[int, str], total: int, verb: str) -> str:
    """'data/x.jsonl: 2 of 300 records are malformed (lines 17, 204): line 17: 'output' is missing'."""
    numbers = list(rows)
    unit, where = places(src, numbers[:FEW])
    listed = ", ".join(map(str, where)) + (f" and {len(numbers) - FEW} more" if len(numbers) > FEW else "")
    count = f"1 of {total} records is {verb}" if len(numbers) == 1 else \
        f"{len(numbers)} of {total} records are {verb} ({unit}s {listed})"
    return f"{src}: {count}: {unit} {where[0]}: {rows[numbers[0]]}"


def load_source(path: str, fmt: str, columns: dict[str, str], *, on_bad_record: str, max_samples: Optional[int],
                num_proc: Optional[int], where: str, roles: Optional[dict[str, str]] = None, stage: str = "sft"
                ) -> tuple[Dataset, Counter, str]:
    """All files of one data path → (internal rows, dropped counts, detected format). `roles`: this source's own
    role names → ours (a registry entry's tags); `stage`: KTO records load only for stage=kto."""
    formats.check_format(fmt, where)
    formats.check_stage(fmt, where, stage)
    files = resolve(path, where)
    raws: list[tuple[str, Dataset, list[Unread]]] = []
    if files is None:
        raws.append((path, read_hub(path, where), []))
    for file in files or []:
        raw, unreadable = read_file(file)
        raws.append((str(file), raw, [(str(file), *problem) for problem in unreadable]))
    parts, detected, dropped = [], set(), Counter()
    code = code_hash(*(Path(__file__).parent / f for f in CODE_FILES))
    for src, raw, unreadable in raws:
        skipped = tuple(row for _, row, _, _ in unreadable)
        if max_samples is not None:
            raw = raw.select(range(min(max_samples, len(raw))))
            unreadable = [bad for bad in unreadable if bad[1] < original_row(len(raw), skipped)]
        if not len(raw) and unreadable:
            found = {row: why for _, row, _, why in unreadable}
            raise UserError(f"{_summary(src, found, len(found), 'malformed')}; no record of it can be read")
        file_fmt = fmt if fmt != "auto" else formats.detect(raw.column_names, columns, f"{where} ({src})")
        formats.check_stage(file_fmt, f"{where} ({src})", stage)
        detected.add(file_fmt)
        features = formats.features(file_fmt)
        converted = raw.map(
            formats.convert_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
            features=features, num_proc=procs(num_proc, len(raw)),
            fn_kwargs={"fmt": file_fmt, "columns": dict(columns), "roles": dict(roles or {}), "src": src,
                       "skipped": skipped},
            new_fingerprint=fingerprint(raw._fingerprint, file_fmt, sorted(columns.items()),
                                        sorted((roles or {}).items()), src, skipped, code),
            desc=f"Reading {Path(src).name}")
        kept, bad = settle(converted, on_bad_record, unreadable=unreadable)
        parts.append(kept)
        dropped += bad
    if len({formats.kind_of(f) for f in detected}) > 1:
        raise UserError(f"{where}: {path} mixes " + " with ".join(sorted(NAMES[formats.kind_of(f)] for f in detected))
                        + "; keep them in separate paths")
    if max_samples is not None:
        parts = [datasets.concatenate_datasets(parts).select(range(min(max_samples, sum(map(len, parts)))))]
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0], dropped, detected.pop()


def weighted(ds: Dataset, weight: float, seed: int, where: str) -> Dataset:
    """`weight` × the source: 0.5 keeps a seeded half, 2 repeats it twice, 1.5 once plus a seeded half."""
    if weight <= 0:
        raise UserError(f"{where}: weight must be positive, got {weight}")
    if weight == 1 or len(ds) == 0:
        return ds
    target = round(weight * len(ds))
    rng = np.random.default_rng(seed)
    indices = np.concatenate([np.tile(np.arange(len(ds)), target // len(ds)),
                              np.sort(rng.permutation(len(ds))[: target % len(ds)])])
    return ds.select(indices.tolist())


@dataclass(frozen=True)
class Source:
    """One training source: data.path, an entry of the data.name registry, or a data.mix item."""

    where: str
    path: str
    fmt: str
    columns: dict[str, str]
    weight: float = 1.0
    roles: dict[str, str] = field(default_factory=dict)
    samples: Optional[int] = None  # exactly this many examples (a registry's num_samples)


def sources(data: Any) -> list[Source]:
    """The recipe's training sources. data.name replaces data.path (recipes name a sample set in data.path;
    naming registry entries means other data); data.mix adds to either."""
    if data.name and not data.dir:
        raise UserError(f"data.name={data.name} needs data.dir=DIR, the folder holding dataset_info.json "
                        "(LLaMA-Factory's dataset_dir, usually its data/)")
    found = [Source("data.path", data.path, data.format, data.columns)] if data.path and not data.name else []
    for name in (n.strip() for n in str(data.name or "").split(",") if n.strip()):
        entry = registry.entry(data.dir, name)
        found.append(Source(f"data.name={name}", entry.path, entry.format, entry.columns, roles=entry.roles,
                            samples=entry.num_samples))
    found += [Source(f"data.mix[{i}]", m.path, m.format, data.columns, m.weight) for i, m in enumerate(data.mix)]
    if not found:
        raise UserError("no training data: set data.path=FILE|DIR|GLOB|HUB_ID, or data.name=NAME data.dir=DIR "
                        "for a dataset_info.json registry (see data/README.md for the formats)")
    return found


def load_splits(recipe: Any) -> tuple[datasets.DatasetDict, Counter, Kind]:
    """The recipe's data as internal rows: "train" (every source, weighted) and "eval" when asked for; also the
    dropped counts and the kind of data (kinds.py), one per run."""
    data = recipe.data
    common = {"on_bad_record": data.on_bad_record, "num_proc": data.num_proc, "stage": recipe.stage}
    parts, dropped, found = [], Counter(), set()
    for i, source in enumerate(sources(data)):
        ds, bad, detected = load_source(source.path, source.fmt, source.columns, max_samples=data.max_samples,
                                        where=source.where, roles=source.roles, **common)
        weight = source.samples / len(ds) if source.samples and len(ds) else source.weight
        parts.append(weighted(ds, weight, recipe.seed + i, source.where))
        dropped += bad
        found.add(formats.kind_of(detected))
    if len(found) > 1:
        raise UserError(f"the training sources combine {' with '.join(NAMES[k] for k in sorted(found))}; a run "
                        "trains one stage: keep one kind per recipe")
    kind = found.pop()
    train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    splits = {"train": train}
    if data.eval_path:
        splits["eval"], bad, fmt = load_source(data.eval_path, data.format, data.columns, max_samples=None,
                                               where="data.eval_path", **common)
        if formats.kind_of(fmt) != kind:
            raise UserError(f"data.eval_path holds {NAMES[formats.kind_of(fmt)]} but the training data is "
                            f"{NAMES[kind]}; held-out data must be of the same kind")
        dropped += bad
    elif data.val_size:
        size = int(data.val_size) if data.val_size >= 1 else max(1, round(data.val_size * len(train)))
        if not 0 < size < len(train):
            raise UserError(f"data.val_size={data.val_size} leaves no training examples out of {len(train)}; "
                            "use a fraction below 1 or a smaller count")
        split = train.train_test_split(test_size=size, seed=recipe.seed)
        splits = {"train": split["train"], "eval": split["test"]}
    return datasets.DatasetDict(splits), dropped, kind
