"""train.precision=auto: the machine's fastest precision that keeps the run — bf16 on GPUs that compute in it,
fp16 on older ones, bf16 on CPUs with bf16 instructions, fp32 elsewhere — resolved once when the recipe loads,
and said in the dry run. The hardware probes are replaced (this machine has one CPU and no GPU); what follows
from them is the product's own code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finetune import config, precision


@pytest.fixture
def machine(monkeypatch):
    def make(flags: set[str], gpus: list[tuple[int, int]]) -> precision.Choice:
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        monkeypatch.setattr(precision, "_gpu_capabilities", lambda: gpus)
        precision.auto.cache_clear()
        return precision.auto()

    yield make
    precision.auto.cache_clear()


@pytest.mark.parametrize("flags, gpus, chosen", [
    ({"avx2", "amx_bf16", "avx512_bf16"}, [], "bf16"),
    ({"avx2", "avx512f", "avx512_bf16"}, [], "bf16"),
    ({"avx2", "avx512f"}, [], "fp32"),  # bf16 would be emulated
    ({"avx2"}, [(8, 0), (9, 0)], "bf16"),  # A100 + H100
    ({"avx2", "amx_bf16"}, [(8, 6), (7, 5)], "fp16"),  # one T4 among them: no bf16 units
])
def test_auto_chooses_what_the_hardware_computes_fastest(machine, flags, gpus, chosen):
    assert machine(flags, gpus).precision == chosen


def test_auto_is_resolved_when_the_recipe_loads_and_saved_as_chosen(machine):
    machine({"avx2"}, [])
    recipe = config.load("qwen2_5_0_5b_lora")
    assert recipe.train.precision == "fp32"
    assert "precision: fp32" in config.to_yaml(recipe)  # a resume or an export elsewhere keeps it
    assert config.with_overrides(recipe, ["train.precision=auto"]).train.precision == "fp32"
    assert config.load("qwen2_5_0_5b_lora", ["train.precision=bf16"]).train.precision == "bf16"  # given: kept


def test_why_says_when_the_recipe_overrides_the_machines_choice(machine):
    machine({"avx2"}, [])
    assert precision.why("fp32").startswith("fp32: no GPU, and this CPU has no bf16 instructions")
    assert precision.why("bf16") == ("bf16 as the recipe says (train.precision=auto would choose fp32: no GPU, and "
                                     "this CPU has no bf16 instructions (amx_bf16 / avx512_bf16): bf16 would be "
                                     "emulated, slower than fp32)")


def test_the_dry_run_says_which_precision_and_why():
    done = subprocess.run([sys.executable, "-m", "finetune", "estimate", "recipe=qwen2_5_0_5b_lora", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    expected = precision.auto()  # this machine, probed for real
    assert report["precision"] == expected.precision and report["precision_why"] == f"{expected.precision}: {expected.why}"
