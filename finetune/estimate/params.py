"""Exact parameter facts of a recipe's model, counted on the real (meta-device) module tree — never from formulas.

The counting itself (finetune.estimate.meta) builds the native model on the meta device and changes it as training
does, from the same plan training builds from (finetune.plan): transformers' bitsandbytes quantizer, PEFT's LoRA
injection, the value head of a reward model. It needs torch, transformers, PEFT and bitsandbytes, seconds of
imports, so its result is cached on disk (finetune.estimate.cache), keyed by everything it depends on: the model's
config, the plan's counted part (what trains, the LoRA and quantization settings, the head), those libraries'
versions and our counting code. An estimate whose facts are cached imports none of them. The package ships the
entries of every shipped recipe and of `recommend` / `list models` (SEED), so a user's first commands count nothing
either.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from functools import cache as memo
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune.config import Recipe
from finetune.estimate import cache
from finetune.estimate.model_facts import Linear, ModelFacts
from finetune.models.registry import ModelSpec
from finetune.plan import model_plan

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")
"""Whose behaviour decides the counts: the module trees, what the quantizer swaps, what PEFT injects."""
COUNTING_CODE = ("estimate/params.py", "estimate/meta.py", "estimate/model_facts.py", "models/native.py",
                 "models/baichuan_alibi.py", "models/convert/*.py")
"""Our code that shapes the counts, relative to the package: the counting, the native classes and configs."""
SEED = Path(__file__).resolve().parent / "seed"
"""Read-only entries made by scripts/make_estimate_seed.py, keyed as the user cache's: under other library versions
or other counting code the key differs and the facts are counted as without a seed, never taken from it."""


def facts(recipe: Recipe, spec: ModelSpec) -> ModelFacts:
    """Exact counts and shapes for this recipe's model and method: from this process's memory, else from the disk
    cache, else from the package's seed, else counted on the meta device (and cached). The key holds what the
    count is given — the model's config and the plan's `Counted` part (finetune.plan: head, what trains, LoRA rank,
    targets and DoRA, quantization), the very object the count reads — plus the library versions and our code."""
    counted = model_plan(recipe, spec).counted()
    model = cache.key(spec.original_config, spec.family.name, _environment())
    entry = cache.key(model, asdict(counted))
    if entry not in _MEMO:
        found = _from_json(cache.load("estimate", spec.name, entry, seed=SEED))
        if found is None:
            from finetune.estimate import meta  # torch, transformers, PEFT, bitsandbytes: only when counting

            found = meta.count(spec, model, counted)
            cache.store("estimate", spec.name, entry, asdict(found))
        _MEMO[entry] = found
    return _MEMO[entry]


def versions() -> list[str]:
    """`name=version` of each of LIBRARIES, without a build's local tag: a CUDA and a CPU build of torch
    ("2.13.0+cu128", "2.13.0+cpu") build the same tree on the meta device, so they share entries (and the seed)."""
    found = []
    for name in LIBRARIES:
        try:
            found.append(f"{name}={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            found.append(f"{name}=none")
    return found


@memo
def _environment() -> str:
    """The library versions and our counting code, as one hash (read once per process). Files are named relative
    to the package, so a checkout and an installed wheel of the same code share keys."""
    package = Path(__file__).resolve().parent.parent
    code = sorted(path for pattern in COUNTING_CODE for path in package.glob(pattern))
    return cache.key(versions(), cache.files_digest(code, relative_to=package))


_MEMO: dict[str, ModelFacts] = {}


_SCALARS = {"int": int, "bool": bool, "str": str}


def _typed(cls: type, data: dict[str, Any], **converted: Any) -> Any:
    """`cls(**data)` when `data` has exactly its fields and every int / bool / str field holds that type."""
    if set(data) != {f.name for f in fields(cls)}:
        raise KeyError(f"the fields of {cls.__name__} differ")
    for f in fields(cls):
        kind = _SCALARS.get(str(f.type))
        if kind is not None and type(data[f.name]) is not kind:
            raise TypeError(f"{cls.__name__}.{f.name} is not {kind.__name__}")
    return cls(**{**data, **converted})


def _from_json(data: Any) -> ModelFacts | None:
    """ModelFacts from its cached JSON form (`asdict`), or None when the entry is not exactly that form (an older
    layout, a damaged file): such an entry is counted again."""
    try:
        return _typed(ModelFacts, data,
                      quantized_numels=tuple(int(n) for n in data["quantized_numels"]),
                      trainable_shapes=tuple(tuple(int(d) for d in shape) for shape in data["trainable_shapes"]),
                      block_linears=tuple(_typed(Linear, linear) for linear in data["block_linears"]))
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
