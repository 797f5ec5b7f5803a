"""The estimator's activation and loss terms against what a training step really allocates, measured on a CPU by
scripts/bench_memory.py's CPU mode: the model is built as training builds it (QLoRA's bitsandbytes 4-bit, the
fp32 upcast, PEFT LoRA, TRL's loss or transformers' full logits), its tensors are swapped for fake ones, and one
forward + backward runs through the real libraries while a dispatch-level tracker records every storage made and
freed. Here at reduced widths (two decoder layers, narrow hidden sizes, a small vocabulary) so every setting runs
in seconds; docs/memory.md has the same table at Qwen2.5-7B's and Llama-2-7B's real widths."""

from __future__ import annotations

import dataclasses

import pytest
import repo_scripts

from finetune.estimate.memory import GiB

REDUCED = {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 8192}
"""Qwen2.5-7B's and Llama-2-7B's shapes, narrowed (GQA kept for Qwen, widths multiples of 64 for bitsandbytes)."""
LENGTH = 256


def _bench():
    """scripts/bench_memory.py: how the benchmark builds a model for training, and the published settings."""
    return repo_scripts.load("bench_memory")


def _cells() -> list:
    """Each setting with both losses under checkpointing (the shipped default); without checkpointing, and with
    eager attention for LoRA and the upcast QLoRA (as the benchmark's table), on the chunked loss — the loss head
    does not depend on either; freeze with and without checkpointing (which layers save)."""
    bench = _bench()
    cells = [bench.CpuCell(model, setting, logits, LENGTH) for model in bench.CPU_MODELS
             for setting in bench.ADAPTER_SETTINGS for logits in ("chunked", "full")]
    cells += [bench.CpuCell(model, setting, "chunked", LENGTH, ckpt=False) for model in bench.CPU_MODELS
              for setting in bench.ADAPTER_SETTINGS]
    cells += [bench.CpuCell(model, setting, "chunked", LENGTH, attn="eager") for model in bench.CPU_MODELS
              for setting in ("lora", "qlora upcast")]
    return cells + [bench.CpuCell(model, "freeze", "chunked", LENGTH, ckpt) for model in bench.CPU_MODELS
                    for ckpt in (True, False)]


def _config(model: str) -> dict:
    return {**REDUCED, "num_key_value_heads": 2 if model.startswith("qwen") else 4}


def _key(cell) -> tuple:
    return dataclasses.astuple(cell)


@pytest.fixture(scope="module")
def rows() -> dict:
    """Every cell measured once (one build per model, setting, checkpointing and attention), by its fields."""
    bench = _bench()
    measured = {}
    for model in bench.CPU_MODELS:
        cells = [cell for cell in _cells() if cell.model == model]
        measured.update({_key(row["cell"]): row for row in bench.run_cpu(cells, 2, **_config(model))})
    return measured


@pytest.mark.parametrize("cell", _cells(), ids=lambda c: f"{c.model}-{c.setting}-{c.logits}-{c.attn}-"
                                                         f"ckpt_{'on' if c.ckpt else 'off'}".replace(" ", "_"))
def test_every_term_is_within_5_percent_of_what_the_step_allocates(rows, cell):
    bench = _bench()
    row = rows[_key(cell)]
    errors = {term: bench.error_pct(row, term) for term in bench.CPU_COLUMNS}
    assert all(abs(e) <= 5 for e in errors.values()), {t: f"{e:+.1f}%" for t, e in errors.items()}


@pytest.mark.parametrize("setting", ["lora", "qlora upcast"])
def test_fake_tensors_allocate_what_real_ones_do(setting):
    """The CPU mode's premise: a step on fake tensors makes and frees the same storages as on real ones (two fresh
    builds: a first step changes the model, as bitsandbytes casts an fp32 bias to the compute dtype for good)."""
    bench = _bench()
    cell = bench.CpuCell("qwen2_5_7b", setting, "full", 64, True, "sdpa")
    recipe = cell.recipe()
    spec = bench.with_layers(cell.model, 2, **{**_config(cell.model), "vocab_size": 1024})
    real = bench.measured_terms(bench.prepare(recipe, spec, "cpu"), recipe)
    model = bench.prepare(recipe, spec, "cpu")
    with bench.to_fake(model):
        fake = bench.measured_terms(model, recipe)
    assert fake == real


def test_plain_stack_logits_are_three_fp32_copies_of_tokens_by_vocabulary(rows):
    """transformers' loss at its peak holds the fp32 log-probabilities, their gradient and its own."""
    row = next(r for r in rows.values() if r["cell"].model == "llama2_7b" and r["cell"].setting == "lora"
               and r["cell"].logits == "full")
    assert row["measured"]["logits"] == pytest.approx(12 * LENGTH * REDUCED["vocab_size"], rel=0.05)
    assert row["measured"]["logits"] / GiB < 0.1  # reduced widths: fast and small


def test_markdown_table_names_every_cell(rows):
    bench = _bench()
    table = bench.cpu_markdown(list(rows.values()), 2)
    assert table.count("\n| ") == len(rows) + 1 and "Largest error" in table


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_whole_steps_of_the_shipped_cpu_recipes_are_within_10_percent(method, precision):
    """The 0.5B's shipped CPU recipes (qwen2_5_0_5b_lora|qlora|full: no checkpointing, QLoRA computing in fp32
    with bf16 adapters) over whole optimizer steps — gradients, optimizer states and the training peak too — at
    reduced widths; docs/memory.md has the same at the real 0.5B's, every layer (`bench_memory.py --recipes`)."""
    bench = _bench()
    recipe = bench.shipped_recipe("qwen2_5_0_5b", method, LENGTH, (f"train.precision={precision}",))
    spec = bench.with_layers("qwen2_5_0_5b", 2, **_config("qwen2_5_0_5b"))
    estimated = bench.estimated_recipe_terms(recipe, spec)
    model = bench.prepare(recipe, spec, "cpu")
    with bench.to_fake(model):
        measured = {**bench.measured_terms(model, recipe), **bench.whole_steps(model, recipe, spec)}
    row = {"estimated": estimated, "measured": measured}
    errors = {term: bench.error_pct(row, term) for term in bench.RECIPE_COLUMNS}
    assert all(abs(e) <= 10 for e in errors.values()), {t: f"{e:+.1f}%" for t, e in errors.items()}
