"""The estimator's model state (weights + trainable weights + gradients + optimizer states) against the bytes
PyTorch really holds after an optimizer step, on a real-shaped config: Qwen2.5-0.5B's widths and 151,936-token
vocabulary, cut to one decoder layer so it trains on a CPU in seconds. Built exactly as scripts/bench_memory.py
builds for the GPU benchmark (bitsandbytes 4/8-bit, PEFT, TRL's fused head, the Trainer's optimizer class)."""

from __future__ import annotations

import dataclasses

import pytest
import repo_scripts
import torch

from finetune import config
from finetune.estimate.memory import model_state_bytes, plan
from finetune.models import registry
from finetune.models.registry import ModelSpec


def _bench():
    """scripts/bench_memory.py: how the benchmark builds a model for training, and the published settings."""
    return repo_scripts.load("bench_memory")


bench = _bench()


def one_layer_qwen() -> ModelSpec:
    base = registry.spec("qwen2_5_0_5b")
    return ModelSpec(base.family, base.model, dataclasses.replace(
        base.variant, name="one_layer", config_overrides={"num_hidden_layers": 1}))


CASES = {
    "full bf16 adamw": ["method=full"],
    "lora bf16 adamw (fp32 adapters)": ["method=lora"],
    "qlora nf4 double-quant paged 8-bit adam (shipped default)": ["method=qlora", "train.optimizer=paged_adamw_8bit"],
    "qlora fp4 single-quant dora adamw": ["method=qlora", "quant.type=fp4", "quant.double_quant=false",
                                          "lora.dora=true"],
    "qlora 8-bit base, 8-bit adam": ["method=qlora", "quant.bits=8", "train.optimizer=adamw_8bit"],
    "qlora nf4 with the fp32 upcast (prepare_model_for_kbit_training)": ["method=qlora", "quant.upcast=true"],
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_model_state_matches_what_pytorch_holds_after_a_step(overrides):
    recipe = config.load(None, ["model=qwen2_5_0_5b", "train.max_length=4", "train.micro_batch=1",
                                "train.grad_accum=1", "train.gradient_checkpointing=false", *overrides])
    spec = one_layer_qwen()
    torch.manual_seed(0)
    model, optimizer = bench.build(recipe, spec, "cpu")
    bench.micro_step(model, recipe, "cpu", torch.Generator().manual_seed(0),
                     torch.amp.GradScaler("cpu", enabled=False))
    optimizer.step()  # states exist from the first step on; the gradients are still held (no zero_grad yet)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    held = sum(bench.state_tensors(model, optimizer).values())

    estimated = model_state_bytes(plan(recipe, spec))

    assert abs(estimated - held) / held < 0.02, f"estimated {estimated:,} vs held {held:,} bytes"
    print(f"{' '.join(overrides)}: held {held:,} B, estimated {estimated:,} B ({100 * (estimated / held - 1):+.2f}%)")
