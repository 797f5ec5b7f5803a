"""Exact parameter facts: published counts for every shipped model, and LoRA / DoRA / 4-bit counts that equal what
PEFT and transformers' bitsandbytes loader really build (tiny models, on the CPU)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from finetune import config
from finetune.errors import UserError
from finetune.estimate.memory import plan
from finetune.estimate.params import facts
from finetune.models import registry
from finetune.models.native import native_config

PUBLISHED = {  # the parameter counts each model publishes (its model card or paper)
    ("chatglm3_6b", "chat"): 6_243_584_000,
    ("chatglm3_6b", "32k"): 6_243_584_000,
    ("baichuan2_7b", "chat"): 7_505_973_248,
    ("baichuan2_13b", "chat"): 13_896_668_160,
    ("llama2_7b", "chat"): 6_738_415_616,
    ("llama2_7b", "zh"): 6_738_415_616 + (55_296 - 32_000) * 4096 * 2,  # enlarged embedding and lm_head
    ("llama2_13b", "chat"): 13_015_864_320,
    ("qwen2_5_7b", "instruct"): 7_615_616_512,
    ("qwen2_5_3b", "instruct"): 3_085_938_688,
    ("qwen2_5_1_5b", "instruct"): 1_543_714_304,
    ("qwen2_5_0_5b", "instruct"): 494_032_768,
    ("qwen1_7b", "chat"): 7_721_324_544,
}


def _recipe(model: str, *overrides: str) -> config.Recipe:
    return config.load(None, [f"model={model}", *overrides])


def test_every_shipped_model_is_counted():
    shipped = {name for name, (_, m) in registry.models().items() if not m.tiny}
    assert shipped == {name for name, _ in PUBLISHED}


@pytest.mark.parametrize(("model", "variant"), PUBLISHED, ids=[f"{m}-{v}" for m, v in PUBLISHED])
def test_parameter_count_equals_the_published_one(model, variant):
    recipe = _recipe(model, f"variant={variant}", "method=full")
    assert facts(recipe, registry.spec(model, variant)).params_total == PUBLISHED[(model, variant)]


def _real_tiny(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(native_config(registry.spec(model)))


@pytest.mark.parametrize("model", ["tiny_qwen2_5", "tiny_chatglm3", "tiny_baichuan2_13b", "tiny_llama2"])
@pytest.mark.parametrize("dora", [False, True])
def test_trainable_count_equals_peft_on_the_real_model(model, dora):
    spec = registry.spec(model)
    recipe = _recipe(model, "method=lora", "lora.r=8", f"lora.dora={str(dora).lower()}")
    peft_model = get_peft_model(_real_tiny(model), LoraConfig(
        r=8, target_modules=list(spec.family.lora_targets), use_dora=dora, task_type="CAUSAL_LM"))
    trainable, total = peft_model.get_nb_trainable_parameters()

    counted = facts(recipe, spec)

    assert counted.params_trainable == trainable
    assert counted.params_total == total - trainable
    assert counted.params_magnitude == sum(p.numel() for n, p in peft_model.named_parameters()
                                           if "lora_magnitude_vector" in n)


def test_lora_targets_subset_counts_only_those_modules():
    spec = registry.spec("tiny_qwen2_5")
    all_targets = facts(_recipe("tiny_qwen2_5", "method=lora"), spec)
    q_and_v = facts(_recipe("tiny_qwen2_5", "method=lora", "lora.targets=[q_proj,v_proj]"), spec)
    assert 0 < q_and_v.params_adapter < all_targets.params_adapter
    assert {lin.name.rsplit(".", 1)[-1] for lin in q_and_v.block_linears if lin.lora} == {"q_proj", "v_proj"}


def test_an_unknown_lora_target_is_named_in_the_error():
    with pytest.raises(UserError, match="qkv_proj"):
        facts(_recipe("tiny_llama2", "method=lora", "lora.targets=[qkv_proj]"), registry.spec("tiny_llama2"))


def test_4bit_counts_and_weight_bytes_equal_what_transformers_loads(tmp_path):
    """The real QLoRA load path (from_pretrained + BitsAndBytesConfig, 16-bit parts left 16-bit, as
    finetune/train/sft.py does it): which weights are 4-bit, and every byte the loaded model holds."""
    spec = registry.spec("tiny_qwen2_5")
    _real_tiny("tiny_qwen2_5").save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map={"": "cpu"},
                                                  quantization_config=BitsAndBytesConfig(
                                                      load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype=torch.bfloat16))
    recipe = _recipe("tiny_qwen2_5", "method=qlora", "train.optimizer=sgd", "train.grad_accum=1")
    counted = facts(recipe, spec)

    packed = [p for p in loaded.parameters() if type(p).__name__ == "Params4bit"]
    assert counted.params_quantized == 2 * sum(p.numel() for p in packed)
    storages: dict[int, int] = {}

    def hold(t: object) -> None:  # a tensor, or a bitsandbytes QuantState holding tensors (and a nested one)
        if isinstance(t, torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        elif hasattr(t, "absmax"):
            for value in vars(t).values():
                hold(value)

    for t in (*loaded.parameters(), *loaded.buffers()):
        hold(t)
        hold(getattr(t, "quant_state", None))
    weights = plan(recipe, spec).phases["load"]["weights"]
    assert weights == pytest.approx(sum(storages.values()), rel=0.005)


def test_block_structure_is_read_from_the_model():
    linears = {lin.name: lin for lin in facts(_recipe("qwen2_5_7b", "method=lora"),
                                              registry.spec("qwen2_5_7b")).block_linears}
    q, k, v = (linears[f"self_attn.{n}_proj"] for n in "qkv")
    assert q.group == k.group == v.group and q.reads == "norm"
    assert linears["self_attn.o_proj"].reads == "attention"
    assert linears["mlp.gate_proj"].group == linears["mlp.up_proj"].group != q.group
    assert linears["mlp.down_proj"].reads == "mlp" and linears["mlp.down_proj"].in_features == 18944
