"""Every registry model as a native transformers class: exact sizes, the ALiBi class, LoRA/QLoRA on converted models."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from finetune.errors import UserError
from finetune.models import native, registry
from finetune.models.baichuan_alibi import alibi_slopes
from finetune.models.tiny import cached_tiny
from finetune.train.model import check_cpu_4bit_widths
from reference_models import baichuan_slopes

PUBLISHED_PARAMETERS = {  # each model's config.json on the Hugging Face hub, counted by arithmetic (no buffers)
    "chatglm3_6b": 6_243_584_000, "baichuan2_7b": 7_505_973_248, "baichuan2_13b": 13_896_668_160,
    "llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320, "qwen2_5_7b": 7_615_616_512,
    "qwen1_7b": 7_721_324_544,
}
CONVERTED_TINY = ["tiny_chatglm3", "tiny_baichuan2_7b", "tiny_baichuan2_13b", "tiny_qwen1"]


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_parameter_count_equals_the_published_arithmetic(name):
    model = native.meta_model(registry.spec(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


def test_every_registry_model_builds_as_its_registry_class():
    for name in registry.models():
        spec = registry.spec(name)
        assert type(native.meta_model(spec)).__name__ == spec.native_class, name


def test_original_family_is_detected_from_config_json_only():
    detected = {name: native.detect_original_family(registry.spec(name).original_config)
                for name in ("chatglm3_6b", "baichuan2_7b", "baichuan2_13b", "qwen1_7b", "qwen2_5_7b", "llama2_7b")}
    assert detected == {"chatglm3_6b": "chatglm3", "baichuan2_7b": "baichuan2", "baichuan2_13b": "baichuan2",
                        "qwen1_7b": "qwen1", "qwen2_5_7b": None, "llama2_7b": None}


def test_alibi_slopes_follow_baichuans_interleave():
    assert alibi_slopes(5).tolist() == [0.25, 0.0625, 0.015625, 0.00390625, 0.5]
    real = alibi_slopes(40).tolist()
    assert real == pytest.approx(baichuan_slopes(40), rel=1e-6)
    assert real[:32] == pytest.approx([2 ** (-8 * (k + 1) / 32) for k in range(32)], rel=1e-6)
    assert real[32:] == pytest.approx([2 ** (-8 * (k + 1) / 64) for k in range(0, 16, 2)], rel=1e-6)


@pytest.fixture(scope="module")
def alibi_dir() -> Path:
    return cached_tiny("tiny_baichuan2_13b")


def test_alibi_model_saves_and_reloads_through_the_auto_classes(alibi_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(alibi_dir).eval()
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(3, 120000, (1, 9), generator=torch.Generator().manual_seed(0))
    assert type(reloaded).__name__ == "BaichuanAlibiForCausalLM"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_alibi_sdpa_and_eager_attention_agree(alibi_dir):
    ids = torch.randint(3, 120000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    logits = {}
    for impl in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(alibi_dir, attn_implementation=impl).eval()
        with torch.no_grad():
            logits[impl] = model(ids, attention_mask=mask).logits
    assert (logits["sdpa"] - logits["eager"]).abs().max() < 1e-5


def test_alibi_packed_row_attends_only_within_each_example(alibi_dir):
    """Padding-free packing (position ids restart per example) must give each example's logits as if alone."""
    model = AutoModelForCausalLM.from_pretrained(alibi_dir, dtype=torch.float32).eval()
    first, second = torch.randint(3, 1000, (1, 7)), torch.randint(3, 1000, (1, 5))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions).logits
        alone = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1)
    assert torch.allclose(together, alone, atol=1e-5)


def test_alibi_left_padded_batch_generates_as_each_prompt_alone(alibi_dir):
    model = AutoModelForCausalLM.from_pretrained(alibi_dir).eval()
    short, long = torch.tensor([[5, 900, 31000]]), torch.tensor([[7, 8, 9, 10, 11, 12]])
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
        alone = model.generate(short, max_new_tokens=4, do_sample=False)
    assert torch.equal(both[0, 3: 3 + alone.shape[1]], alone[0])


def test_alibi_gradient_checkpointing_gives_the_same_gradients(alibi_dir):
    ids = torch.randint(3, 120000, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(alibi_dir).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def _train(model, ids: torch.Tensor, steps: int = 4) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)  # 2e-2 overshoots by the 4th step on some widths
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _lora(spec) -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(spec.family.lora_targets),
                      task_type="CAUSAL_LM")


@pytest.mark.parametrize("name", CONVERTED_TINY)
def test_converted_model_trains_lora_and_reloads_its_adapter(name, tmp_path):
    spec, path = registry.spec(name), cached_tiny(name)
    ids = torch.randint(3, 30000, (1, 16), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), _lora(spec))
    losses = _train(model, ids)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (reloaded(ids).logits - trained).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["tiny_chatglm3", "tiny_baichuan2_13b"])  # the non-Llama/Qwen2 classes
def test_converted_model_trains_qlora_in_4_bit(name):
    spec, path = registry.spec(name), cached_tiny(name)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = get_peft_model(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False), _lora(spec))
    ids = torch.randint(3, 30000, (1, 16), generator=torch.Generator().manual_seed(0))
    losses = _train(model, ids)
    assert losses[-1] < losses[0]


TINY = [name for name, (_, model) in registry.models().items() if model.tiny]


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_pack_for_bitsandbytes_cpu_4bit_kernels(name):
    """On CPUs with AVX512-bf16/AMX, bitsandbytes repacks 4-bit weights before inference and asserts on odd widths;
    running that same packing function here fails on any CPU where it would fail there."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(cached_tiny(name), quantization_config=quant, device_map="cpu")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers
    for layer in layers:
        _convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))
    check_cpu_4bit_widths(model)  # and our own check agrees


def test_odd_widths_get_a_clear_message_before_bitsandbytes_asserts():
    from bitsandbytes.nn import Linear4bit

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), Linear4bit(64, 80))
    with pytest.raises(UserError, match="layer 1 is 80 wide.*multiples of 32.*method=lora"):
        check_cpu_4bit_widths(model)


def test_no_code_path_enables_remote_code():
    package = Path(native.__file__).resolve().parents[1]
    pattern = re.compile(r"""trust_remote_code["']?\s*[=:]\s*True""")
    offenders = [f"{p}:{n}" for p in package.rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
