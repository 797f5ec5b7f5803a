"""The user's data sources turned into the internal schema (formats.py), mixed and split.

Every file is loaded on its own (files.py) so each row keeps its origin (`_src`, `_row`): a bad record is then
reported as "data/x.jsonl line 7: 'output' is missing", not as "row 4711 of a concatenation". Rows the formats
mark bad are dropped and counted, or stop the run naming the first one (`settle`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
from datasets import Dataset
from datasets.fingerprint import Hasher

from finetune.data import formats, registry
from finetune.data.files import locate, read_file, read_hub, resolve
from finetune.errors import UserError

MIN_ROWS_PER_PROC = 2000  # below this, worker start-up costs more than it saves
CODE_FILES = ("formats.py", "turns.py", "files.py", "load.py")


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


def settle(ds: Dataset, on_bad_record: str, policy: tuple[str, ...] = ()) -> tuple[Dataset, Counter]:
    """Drop the rows marked bad (counting them), or raise for the first one when bad records are fatal.
    Reasons in `policy` are length-policy drops, counted but never fatal."""
    drops = column(ds, "_drop")
    counts = Counter(d for d in drops if d)
    if not counts:
        return ds, counts
    if on_bad_record == "error" and set(counts) - set(policy):
        first = next(i for i, d in enumerate(drops) if d and d not in policy)
        bad = ds[first]
        raise UserError(f"{locate(bad['_src'], bad['_row'])}: {bad['_why']}; fix the record, or set "
                        f"data.on_bad_record=skip to leave such records out (they are counted)")
    keep = [i for i, d in enumerate(drops) if not d]
    return ds.select(keep), counts


def load_source(path: str, fmt: str, columns: dict[str, str], *, on_bad_record: str, max_samples: Optional[int],
                num_proc: Optional[int], where: str, roles: Optional[dict[str, str]] = None, stage: str = "sft"
                ) -> tuple[Dataset, Counter, str]:
    """All files of one data path → (internal rows, dropped counts, detected format). `roles`: this source's own
    role names → ours (a registry entry's tags); `stage`: KTO records load only for stage=kto."""
    formats.check_format(fmt, where)
    formats.check_stage(fmt, where, stage)
    files = resolve(path, where)
    raws: list[tuple[str, Dataset]] = []
    dropped: Counter = Counter()
    if files is None:
        raws.append((path, read_hub(path, where)))
    for file in files or []:
        raw, skipped = read_file(file, on_bad_record)
        raws.append((str(file), raw))
        dropped += skipped
    parts, detected = [], set()
    code = code_hash(*(Path(__file__).parent / f for f in CODE_FILES))
    for src, raw in raws:
        if max_samples is not None:
            raw = raw.select(range(min(max_samples, len(raw))))
        file_fmt = fmt if fmt != "auto" else formats.detect(raw.column_names, columns, f"{where} ({src})")
        formats.check_stage(file_fmt, f"{where} ({src})", stage)
        detected.add(file_fmt)
        features = formats.features(file_fmt)
        converted = raw.map(
            formats.convert_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
            features=features, num_proc=procs(num_proc, len(raw)),
            fn_kwargs={"fmt": file_fmt, "columns": dict(columns), "roles": dict(roles or {}), "src": src},
            new_fingerprint=fingerprint(raw._fingerprint, file_fmt, sorted(columns.items()),
                                        sorted((roles or {}).items()), src, code),
            desc=f"Reading {Path(src).name}")
        kept, bad = settle(converted, on_bad_record)
        parts.append(kept)
        dropped += bad
    if len({formats.kind_of(f) for f in detected}) > 1:
        raise UserError(f"{where}: {path} mixes preference data with SFT data; keep them in separate paths")
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


def load_splits(recipe: Any) -> tuple[datasets.DatasetDict, Counter, bool]:
    """The recipe's data as internal rows: "train" (every source, weighted) and "eval" when asked for; also the
    dropped counts and whether the data is preference data (pairs, or KTO's judged answers)."""
    data = recipe.data
    common = {"on_bad_record": data.on_bad_record, "num_proc": data.num_proc, "stage": recipe.stage}
    parts, dropped, kinds = [], Counter(), set()
    for i, source in enumerate(sources(data)):
        ds, bad, detected = load_source(source.path, source.fmt, source.columns, max_samples=data.max_samples,
                                        where=source.where, roles=source.roles, **common)
        weight = source.samples / len(ds) if source.samples and len(ds) else source.weight
        parts.append(weighted(ds, weight, recipe.seed + i, source.where))
        dropped += bad
        kinds.add(formats.kind_of(detected))
    if len(kinds) > 1:
        names = {"sft": "SFT data", "preference": "preference data (prompt/chosen/rejected)",
                 "kto": "KTO data (judged answers)"}
        raise UserError(f"the training sources combine {' with '.join(names[k] for k in sorted(kinds))}; a run "
                        "trains one stage: keep one kind per recipe")
    train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    splits = {"train": train}
    if data.eval_path:
        splits["eval"], bad, _ = load_source(data.eval_path, data.format, data.columns, max_samples=None,
                                             where="data.eval_path", **common)
        dropped += bad
    elif data.val_size:
        size = int(data.val_size) if data.val_size >= 1 else max(1, round(data.val_size * len(train)))
        if not 0 < size < len(train):
            raise UserError(f"data.val_size={data.val_size} leaves no training examples out of {len(train)}; "
                            "use a fraction below 1 or a smaller count")
        split = train.train_test_split(test_size=size, seed=recipe.seed)
        splits = {"train": split["train"], "eval": split["test"]}
    return datasets.DatasetDict(splits), dropped, kinds.pop() != "sft"
