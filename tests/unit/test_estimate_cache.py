"""The on-disk cache of model facts: a warm estimate counts nothing and imports no torch, every input of the count
is part of the key, and a damaged entry is counted again, never trusted. The package's seed answers a first run
exactly as the user's cache would, and only for the very same key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import repo_scripts

from finetune import config
from finetune.estimate import cache, meta, params
from finetune.models import registry

MODEL = "tiny_qwen2_5"


@pytest.fixture
def counts(tmp_path, monkeypatch) -> list[tuple]:
    """An empty cache, an empty seed (tmp_path/seed) and an empty in-process memo; records every real count
    (meta.count call)."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(params, "SEED", tmp_path / "seed")
    monkeypatch.setattr(params, "_MEMO", {})
    calls: list[tuple] = []
    real = meta.count

    def counting(spec, model_key, counted):
        calls.append((spec.name, counted))
        return real(spec, model_key, counted)

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


def test_a_cuda_and_a_cpu_build_of_torch_share_entries(monkeypatch):
    real_version = metadata.version
    seen = set()
    for build in ("2.13.0+cu128", "2.13.0+cpu", "2.13.0"):
        monkeypatch.setattr(params.metadata, "version",
                            lambda name, build=build: build if name == "torch" else real_version(name))
        params._environment.cache_clear()
        seen.add((params.versions()[0], params._environment()))
    params._environment.cache_clear()
    assert len(seen) == 1 and next(iter(seen))[0] == "torch=2.13.0"


def test_the_counting_code_hashes_alike_wherever_it_is_installed(tmp_path):
    copies = []
    for place in ("checkout", "site-packages"):
        package = tmp_path / place / "finetune"
        shutil.copytree(Path(params.__file__).parent, package / "estimate")
        copies.append(cache.files_digest(sorted(package.glob("estimate/*.py")), relative_to=package))
    assert copies[0] == copies[1]


def test_a_seed_entry_answers_a_first_run_without_counting_or_importing_torch(counts, tmp_path):
    counted = _facts()
    (tmp_path / "estimate").rename(tmp_path / "seed")  # the counted entry becomes the seed; the user cache is empty
    code = ("import sys; from pathlib import Path; from finetune import config; from finetune.models import registry; "
            "from finetune.estimate import params; from finetune.estimate.memory import plan; "
            "params.SEED = Path(sys.argv[1]); "
            f"r = config.load(None, ['model={MODEL}', 'method=qlora']); "
            f"print(plan(r, registry.spec('{MODEL}')).peak_bytes); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'finetune.estimate.meta') "
            "if m in sys.modules))")
    user = tmp_path / "user"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "seed")], capture_output=True, text=True,
                         check=True, env={**os.environ, "FINETUNE_CACHE": str(user)})
    assert out.stdout.splitlines()[1] == "[]"
    assert not (user / "estimate").exists()  # read from the seed, not copied into the user's cache

    params._MEMO.clear()  # the same in this process: the fixture's empty user cache, the seed answers
    assert _facts() == counted and len(counts) == 1


def test_a_miss_in_the_cache_and_the_seed_is_counted_and_cached_not_seeded(counts, tmp_path, monkeypatch):
    r8 = _facts("lora.r=8")
    (tmp_path / "estimate").rename(tmp_path / "seed")
    monkeypatch.setattr(params, "_MEMO", {})

    r16 = _facts("lora.r=16")  # not in the seed
    assert len(counts) == 2 and r16.params_adapter == 2 * r8.params_adapter
    assert len(_entries(tmp_path)) == 1 and len(list((tmp_path / "seed").glob("*.json"))) == 1

    real_version = metadata.version  # a seed made under other versions is never used
    monkeypatch.setattr(params.metadata, "version", lambda name: "0.0.1" if name == "peft" else real_version(name))
    monkeypatch.setattr(params, "_MEMO", {})
    params._environment.cache_clear()
    try:
        assert _facts("lora.r=8") == r8
    finally:
        params._environment.cache_clear()
    assert len(counts) == 3




def test_the_seed_holds_every_entry_the_shipped_recipes_recommend_and_list_models_need(tmp_path, monkeypatch):
    script = repo_scripts.load("make_estimate_seed")
    made = json.loads((params.SEED / script.MANIFEST).read_text(encoding="utf-8"))["versions"]
    if made != params.versions():
        pytest.skip(f"the seed was made under {', '.join(made)}; installed here: {', '.join(params.versions())} "
                    f"(its keys cannot match, so a first run counts; the seed is checked where the versions match)")
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("FINETUNE_RECIPES", raising=False)
    monkeypatch.setattr(params, "_MEMO", {})

    def missing(spec, model_key, counted):
        pytest.fail(f"{spec.name} {spec.variant.name} {counted} is not in "
                    f"finetune/estimate/seed/ (the counting code, a model config or a recipe's settings changed): "
                    f"run python scripts/make_estimate_seed.py")

    monkeypatch.setattr(meta, "count", missing)
    script.plan_everything()
    assert not (tmp_path / "estimate").exists()
