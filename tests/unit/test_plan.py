"""One plan of the model (finetune.plan) for training, the estimator and the memory benchmark: what it decides, and
that the three builders agree with it — the LoRA targets, the quantized weights, the dtypes and the trained parameter
count seen by training's load path (load_model + lora_config, on a tiny checkpoint), by the estimator's meta-device
count and by scripts/bench_memory.py's model are the same."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import repo_scripts
import torch
from peft import get_peft_model

from finetune import config
from finetune.estimate.activations import dtype_bytes
from finetune.estimate.params import facts
from finetune.models import registry
from finetune.models.tiny import cached_tiny
from finetune.plan import ALL_LINEAR, OPTIMIZERS, VALUE_HEAD, model_plan
from finetune.train.model import DTYPES, load_model, lora_config

CASES = {  # id -> (tiny model, overrides)
    "lora": ("tiny_qwen2_5", ["method=lora"]),
    "qlora": ("tiny_qwen2_5", ["method=qlora"]),
    "qlora-8bit-upcast-targets": ("tiny_qwen2_5", ["method=qlora", "quant.bits=8", "quant.upcast=true",
                                                  "lora.targets=[q_proj,v_proj]"]),
    "full": ("tiny_qwen2_5", ["method=full"]),
    "full-fp16": ("tiny_llama2", ["method=full", "train.precision=fp16"]),
    "freeze": ("tiny_qwen2_5", ["method=freeze", "freeze.layers=1"]),
    "rm-lora": ("tiny_qwen2_5", ["stage=rm", "method=lora"]),
    "rm-freeze": ("tiny_qwen2_5", ["stage=rm", "method=freeze", "freeze.layers=1"]),
    "glm-family-targets": ("tiny_chatglm3", ["method=lora"]),
    "recipe-targets-dora": ("tiny_llama2", ["method=lora", "lora.targets=[q_proj,v_proj]", "lora.dora=true"]),
}


def _recipe(model: str, *overrides: str) -> config.Recipe:
    return config.load(None, [f"model={model}", "train.optimizer=sgd", *overrides])


# ------------------------------------------------------------------------------------------- what the plan says

def test_targets_are_the_recipes_else_the_familys_else_all_linear():
    glm = registry.spec("tiny_chatglm3")
    assert model_plan(_recipe("tiny_chatglm3"), glm).lora.targets == glm.family.lora_targets
    assert glm.family.lora_targets != registry.spec("tiny_qwen2_5").family.lora_targets
    assert model_plan(_recipe("tiny_chatglm3", "lora.targets=[query_key_value]"), glm).lora.targets == (
        "query_key_value",)
    assert model_plan(_recipe("tiny_chatglm3"), None).lora.targets == ALL_LINEAR
    assert model_plan(_recipe("tiny_chatglm3", "method=full"), glm).lora is None


@pytest.mark.parametrize(("overrides", "load", "kept", "trained"), [
    (["method=lora"], "bf16", "bf16", "fp32"),  # PEFT's autocast_adapter_dtype
    (["method=lora", "distributed=zero3"], "bf16", "bf16", "bf16"),  # TRL: autocast_adapter_dtype=False
    (["method=qlora"], "bf16", "bf16", "bf16"),  # TRL casts the adapters on a quantized base
    (["method=qlora", "quant.upcast=true"], "bf16", "fp32", "bf16"),
    (["method=full"], "bf16", "bf16", "bf16"),
    (["method=full", "train.precision=fp16"], "fp32", "fp32", "fp32"),  # fp32 master weights for GradScaler
    (["method=freeze", "train.precision=fp32"], "fp32", "fp32", "fp32"),
])
def test_dtypes(overrides, load, kept, trained):
    p = model_plan(_recipe("tiny_qwen2_5", *overrides), registry.spec("tiny_qwen2_5"))
    assert (p.load_dtype, p.kept_dtype, p.trained_dtype) == (load, kept, trained)


def test_quantization_storage_is_the_compute_dtype_only_when_sharded():
    spec = registry.spec("tiny_qwen2_5")
    one = model_plan(_recipe("tiny_qwen2_5", "method=qlora", "quant.compute_dtype=fp16"), spec)
    sharded = model_plan(_recipe("tiny_qwen2_5", "method=qlora", "distributed=fsdp", "num_gpus=2"), spec)
    assert (one.quant_storage, one.compute_dtype, one.load_dtype) == ("uint8", "fp16", "fp16")
    assert (sharded.quant_storage, sharded.shards_weights) == ("bf16", True)
    assert model_plan(_recipe("tiny_qwen2_5", "method=lora"), spec).quant is None


def test_what_trains_and_the_head():
    spec = registry.spec("tiny_qwen2_5")
    rm = model_plan(_recipe("tiny_qwen2_5", "stage=rm", "method=freeze", "freeze.layers=1"), spec)
    assert (rm.head, rm.trains, rm.freeze_layers, rm.full_modules) == ("value", "last_layers", 1, (VALUE_HEAD,))
    sft = model_plan(_recipe("tiny_qwen2_5", "method=lora"), spec)
    assert (sft.head, sft.trains, sft.full_modules, sft.lora.task_type) == ("causal_lm", "adapter", (), "CAUSAL_LM")
    assert model_plan(_recipe("tiny_qwen2_5", "stage=rm"), spec).lora.task_type == "SEQ_CLS"


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_optim_is_the_transformers_name(optimizer):
    from transformers.training_args import OptimizerNames

    p = model_plan(_recipe("tiny_qwen2_5", f"train.optimizer={optimizer}"), registry.spec("tiny_qwen2_5"))
    assert p.optim == OPTIMIZERS[optimizer] and p.optim in {o.value for o in OptimizerNames}


def test_the_plan_imports_no_torch():
    code = ("import sys; import finetune.plan; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ the three builders agree with it

def _seen(model: torch.nn.Module) -> dict:
    """What a built model shows: the leaf names LoRA adapted, the trained parameter count, the weights stored in
    4/8 bit (as elements), and the dtypes of frozen unquantized weights and of the adapters."""
    quantized = [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")
                 and type(m).__name__ in ("Linear4bit", "Linear8bitLt")]  # not PEFT's wrappers of the same name
    adapters = {p.dtype for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    return {
        "targets": {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")},
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "quantized": sum(m.in_features * m.out_features for m in quantized),
        "kept": {p.dtype for p in model.get_input_embeddings().parameters()},
        "adapters": adapters,
    }


def _trained_by_training(recipe: config.Recipe, spec: registry.ModelSpec) -> dict:
    """finetune.train.model's path: load_model on the tiny checkpoint, then the adapter TRL attaches (PEFT's
    get_peft_model with lora_config, as TRL calls it when neither ZeRO-3 nor a quantized base changes the dtype)."""
    session = SimpleNamespace(recipe=recipe, spec=spec, trust_remote_code=False,
                              launch=SimpleNamespace(use_cpu=True, device="cpu"),
                              model=SimpleNamespace(path=cached_tiny(spec.name)))
    model = load_model(session)
    peft = lora_config(recipe, spec)
    return _seen(get_peft_model(model, peft) if peft else model)


@pytest.fixture(scope="module")
def bench():
    return repo_scripts.load("bench_memory")


@pytest.mark.parametrize("case", CASES)
def test_training_the_estimator_and_the_benchmark_build_the_same_model(case, bench):
    model, overrides = CASES[case]
    spec, recipe = registry.spec(model), _recipe(model, *overrides)
    p = model_plan(recipe, spec)
    training = _trained_by_training(recipe, spec)
    benchmark = _seen(bench.prepare(recipe, spec, "cpu"))
    counted = facts(recipe, spec)
    estimated = {
        "targets": {lin.name.rsplit(".", 1)[-1] for lin in counted.block_linears if lin.lora},
        "trainable": counted.params_trainable,
        "quantized": counted.params_quantized,
    }

    planned = set(p.lora.targets) if p.lora else set()
    assert training["targets"] == benchmark["targets"] == estimated["targets"] == planned
    assert training["trainable"] == benchmark["trainable"] == estimated["trainable"] > 0
    assert training["quantized"] == benchmark["quantized"] == estimated["quantized"]
    assert (estimated["quantized"] > 0) == (p.quant is not None)
    assert training["kept"] == benchmark["kept"] == {DTYPES[p.kept_dtype]}
    if p.lora:
        assert benchmark["adapters"] == {DTYPES[p.trained_dtype]}
        if p.quant is None:  # a quantized base's adapters are cast by TRL's trainer, which this path does not run
            assert training["adapters"] == {DTYPES[p.trained_dtype]}
    size = {"fp32": 4, "fp16": 2, "bf16": 2}
    b = dtype_bytes(recipe)  # the memory model's bytes per element
    assert (b.weight, b.kept, b.trainable) == (size[p.load_dtype], size[p.kept_dtype], size[p.trained_dtype])


def test_the_benchmark_builds_the_optimizer_training_asks_for(bench):
    spec = registry.spec("tiny_qwen2_5")
    recipe = _recipe("tiny_qwen2_5", "method=lora", "train.optimizer=adafactor")
    _, optimizer = bench.build(recipe, spec, "cpu")
    assert type(optimizer).__name__ == "Adafactor"
