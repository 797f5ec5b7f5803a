"""The on-disk cache of model facts: a warm estimate counts nothing and imports no torch, every input of the count
is part of the key, and a damaged entry is counted again, never trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest

from finetune import config
from finetune.estimate import cache, meta, params
from finetune.models import registry

MODEL = "tiny_qwen2_5"


@pytest.fixture
def counts(tmp_path, monkeypatch) -> list[tuple]:
    """An empty cache and an empty in-process memo; records every real count (meta.count call)."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(params, "_MEMO", {})
    calls: list[tuple] = []
    real = meta.count

    def counting(spec, model_key, method, lora, quant):
        calls.append((spec.name, method, lora, quant))
        return real(spec, model_key, method, lora, quant)

    monkeypatch.setattr(meta, "count", counting)
    return calls


def _facts(*overrides: str):
    recipe = config.load(None, [f"model={MODEL}", "method=qlora", *overrides])
    return params.facts(recipe, registry.spec(MODEL))


def _entries(tmp_path) -> list:
    return sorted((tmp_path / "estimate").glob(f"{MODEL}-*.json"))


def test_a_second_process_reads_the_facts_instead_of_counting(counts, tmp_path, monkeypatch):
    first = _facts()
    monkeypatch.setattr(params, "_MEMO", {})  # as a new process starts
    second = _facts()
    assert len(counts) == 1 and second == first
    assert len(_entries(tmp_path)) == 1


def test_a_changed_setting_or_library_version_is_a_new_entry(counts, tmp_path, monkeypatch):
    r64 = _facts("lora.r=64")
    r8 = _facts("lora.r=8")
    assert r8.params_adapter * 8 == r64.params_adapter
    _facts("lora.r=8", "quant.double_quant=false")
    assert len(counts) == 3 and len(_entries(tmp_path)) == 3

    real_version = metadata.version
    monkeypatch.setattr(params.metadata, "version",
                        lambda name: "0.0.1" if name == "peft" else real_version(name))
    monkeypatch.setattr(params, "_MEMO", {})
    params._environment.cache_clear()
    try:
        _facts("lora.r=8")
    finally:
        params._environment.cache_clear()
    assert len(counts) == 4 and len(_entries(tmp_path)) == 4


def _edit(**changes):
    """Damage: the stored facts with some fields changed (None: removed)."""
    def damage(text: str) -> str:
        stored = json.loads(text)
        facts = {k: v for k, v in {**stored["value"], **changes}.items() if v is not None}
        return json.dumps({**stored, "value": facts})
    return damage


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],  # a partial write
    lambda text: "",
    lambda text: "not json at all",
    _edit(params_total=None),  # an older layout
    _edit(extra_field=1),  # a newer one
    _edit(layers="24"),  # a wrong type
    lambda text: json.dumps({**json.loads(text), "key": "another"}),  # a file for another key
], ids=["partial", "empty", "garbage", "missing-field", "extra-field", "wrong-type", "other-key"])
def test_a_damaged_entry_is_counted_again_and_replaced(counts, tmp_path, monkeypatch, damage):
    good = _facts()
    [entry] = _entries(tmp_path)
    entry.write_text(damage(entry.read_text(encoding="utf-8")), encoding="utf-8")
    monkeypatch.setattr(params, "_MEMO", {})

    assert _facts() == good
    assert len(counts) == 2
    assert cache.load("estimate", MODEL, entry.stem.split("-", 1)[1]) is not None  # rewritten whole


def test_an_estimate_from_cached_facts_imports_no_torch(counts, tmp_path):
    _facts()
    code = ("import sys; from finetune import config; from finetune.models import registry; "
            "from finetune.estimate.memory import plan; "
            f"r = config.load(None, ['model={MODEL}', 'method=qlora']); "
            f"print(plan(r, registry.spec('{MODEL}')).peak_bytes); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FINETUNE_CACHE": str(tmp_path)})
    assert out.stdout.splitlines()[1] == "[]"
    assert len(counts) == 1
