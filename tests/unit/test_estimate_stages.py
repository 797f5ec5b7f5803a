"""The estimator per stage (finetune/estimate/stages.py) and for method=freeze: what each stage adds to a step,
and the exact trainable count when only the last decoder layers train."""

from __future__ import annotations

import pytest

from finetune import config
from finetune.estimate.memory import plan
from finetune.estimate.report import estimate_report, render_estimate
from finetune.models import registry

SPEC = "qwen2_5_0_5b"


def _plan(*overrides: str):
    """Micro-batches of 2 (KTO pairs each answer with another of its micro-batch) and 16 per step (GRPO's groups
    of up to 16 answers fill it)."""
    return plan(config.load(None, [f"model={SPEC}", "train.micro_batch=2", "train.grad_accum=8", *overrides]),
                registry.spec(SPEC))


@pytest.mark.parametrize("stage", ["dpo", "kto", "orpo", "simpo", "rm"])
def test_paired_stages_run_two_sequences_per_example(stage):
    sft, other = _plan("stage=sft"), _plan(f"stage={stage}")
    assert other.stage_terms["sequences_per_micro_batch"] == 2 * sft.stage_terms["sequences_per_micro_batch"]
    assert other.phases["loss backward"]["activations"] > 1.9 * sft.phases["loss backward"]["activations"]


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_reference_models_cost_a_copy_only_for_full_weights(stage):
    full, lora = _plan("method=full", f"stage={stage}"), _plan("method=lora", f"stage={stage}")
    assert full.stage_terms["reference_copy_bytes"] == 2 * full.params_total  # bf16
    assert full.phases["load"]["weights"] == _plan("method=full").phases["load"]["weights"] + 2 * full.params_total
    assert "reference_copy_bytes" not in lora.stage_terms  # the adapter is disabled instead


@pytest.mark.parametrize("stage", ["orpo", "simpo", "rm"])
def test_reference_free_stages_hold_no_copy(stage):
    def beyond_one_copy(p):  # weights loaded beyond one bf16 copy of the model's own parameters (rm's has a value
        return p.phases["load"]["weights"] - 2 * p.params_total  # head instead of the LM head): the buffers alone

    assert beyond_one_copy(_plan("method=full", f"stage={stage}")) == beyond_one_copy(_plan("method=full"))


def test_grpo_holds_generation_buffers_and_a_reference_only_with_a_kl_penalty():
    small, big = (_plan("stage=grpo", f"grpo.num_generations={n}") for n in (4, 16))
    assert big.stage_terms["generation_bytes"] > 3.5 * small.stage_terms["generation_bytes"]
    assert big.phases["generation"]["activations"] == big.stage_terms["generation_bytes"]
    assert "reference_copy_bytes" in _plan("method=full", "stage=grpo", "grpo.beta=0.04").stage_terms
    assert "reference_copy_bytes" not in _plan("method=full", "stage=grpo").stage_terms


def test_the_dry_run_names_the_stage_terms():
    recipe = config.load(None, [f"model={SPEC}", "stage=grpo", "gpu_mem=24"])
    out = estimate_report(recipe, registry.spec(SPEC), [], gpu_mem=24)
    assert set(out["stage_terms"]) == {"sequences_per_micro_batch", "generation_bytes"}
    from rich.console import Console

    console = Console(width=160, record=True)
    console.print(render_estimate(out))
    text = console.export_text()
    assert "stage=grpo: sequences per micro-batch 1; generation buffers" in text


def test_freeze_counts_exactly_the_last_layers():
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = registry.spec("tiny_qwen2_5")
    recipe = config.load(None, ["model=tiny_qwen2_5", "method=freeze", "freeze.layers=1"])
    from finetune.models import hub

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hub.resolve(recipe).path))
    from finetune.train.model import freeze_all_but_last

    freeze_all_but_last(model, 1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan(recipe, spec).params_trainable == trainable
    assert trainable == sum(p.numel() for p in model.model.layers[-1].parameters())
    two = plan(config.with_overrides(recipe, ["freeze.layers=2"]), spec)
    assert two.params_trainable == 2 * trainable and two.params_trainable < plan(
        config.with_overrides(recipe, ["method=full"]), spec).params_trainable
