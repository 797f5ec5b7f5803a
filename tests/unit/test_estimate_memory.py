"""The memory plan: its activation model against what autograd really saves, its phases, the published
measurements it must reproduce, and the report / recommendations built on it."""

from __future__ import annotations

import json

import pytest
import repo_scripts
import torch
from rich.console import Console

from finetune import config
from finetune.errors import UserError
from finetune.estimate import recommend, report
from finetune.estimate.gpu import GPU, KNOWN_GPUS, GiB
from finetune.estimate.activations import saved_after_forward
from finetune.estimate.memory import CUDA_CONTEXT_BYTES, TERMS, plan
from finetune.models import registry


def _load(*overrides: str) -> config.Recipe:
    return config.load(None, list(overrides))


def _bench():
    """scripts/bench_memory.py: how the benchmark builds a model for training, and the published settings."""
    return repo_scripts.load("bench_memory")


def _saved_by_autograd(model: torch.nn.Module, recipe: config.Recipe) -> int:
    """Bytes of every distinct storage autograd saves in one forward (weights and quantized weights excluded)."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (1, recipe.train.max_length),
                        generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, fused_lm_head=True)
    return sum(saved.values())


ACTIVATION_CASES = [  # (model, method, attention, gradient checkpointing)
    ("tiny_qwen2_5", "full", "sdpa", False),
    ("tiny_qwen2_5", "lora", "eager", False),
    ("tiny_llama2", "full", "eager", False),
    ("tiny_chatglm3", "lora", "sdpa", False),
    ("tiny_chatglm3", "qlora", "sdpa", True),
    ("tiny_qwen1", "qlora", "eager", False),
    ("tiny_baichuan2_7b", "lora", "sdpa", True),
    ("tiny_baichuan2_13b", "qlora", "sdpa", False),  # ALiBi: an fp32 mask, cast for every layer
    ("tiny_qwen2_5", "freeze", "sdpa", False),  # freeze.layers=1 of 2: the frozen layer saves nothing
    ("tiny_llama2", "freeze", "eager", False),
    ("tiny_baichuan2_13b", "freeze", "sdpa", True),
]


@pytest.mark.parametrize(("model", "method", "attn", "ckpt"), ACTIVATION_CASES,
                         ids=["-".join(map(str, case)) for case in ACTIVATION_CASES])
def test_saved_activations_match_what_autograd_saves(model, method, attn, ckpt):
    # LoRA dropout off: on a CPU dropout keeps a full-size mask, on a GPU a boolean one (what the plan counts)
    recipe = _load(f"model={model}", f"method={method}", f"train.attn_implementation={attn}",
                   f"train.gradient_checkpointing={str(ckpt).lower()}", "train.max_length=64",
                   "train.micro_batch=1", "lora.dropout=0", "freeze.layers=1")
    spec = registry.spec(model)
    built, _ = _bench().build(recipe, spec, "cpu")

    real = _saved_by_autograd(built, recipe)

    # with checkpointing the hooks cannot see what the checkpoint keeps as its inputs (rotary tables, masks),
    # which the plan counts: on a 64-wide tiny model that is a tenth of the little that is saved
    assert saved_after_forward(recipe, spec) == pytest.approx(real, rel=0.15 if ckpt else 0.10)


def test_the_peak_is_the_largest_moment_not_the_sum_of_terms():
    p = plan(config.load("qwen7b_lora", []), registry.spec("qwen2_5_7b"))
    totals = {name: sum(parts.values()) for name, parts in p.phases.items()}
    assert p.peak_bytes == max(totals.values()) == totals[p.peak_phase]
    assert set(p.breakdown) == set(TERMS) and sum(p.breakdown.values()) == p.peak_bytes
    everything = sum(max(parts.get(term, 0) for parts in p.phases.values()) for term in TERMS)
    assert p.peak_bytes < everything


def _qwen7b(*overrides: str) -> int:
    recipe = _load("model=qwen2_5_7b", "train.micro_batch=1", "train.max_length=2048", *overrides)
    return plan(recipe, registry.spec("qwen2_5_7b")).peak_bytes


def test_each_memory_saving_setting_lowers_the_peak():
    assert _qwen7b("method=qlora") < _qwen7b("method=lora") < _qwen7b("method=full")
    assert _qwen7b("train.gradient_checkpointing=true") < _qwen7b("train.gradient_checkpointing=false")
    assert _qwen7b("train.max_length=1024") < _qwen7b("train.max_length=2048")
    assert _qwen7b("train.attn_implementation=sdpa", "train.max_length=4096") < \
        _qwen7b("train.attn_implementation=eager", "train.max_length=4096")
    assert _qwen7b("method=qlora", "quant.double_quant=true") < _qwen7b("method=qlora", "quant.double_quant=false")
    assert _qwen7b("method=full", "train.optimizer=adamw_8bit") < _qwen7b("method=full", "train.optimizer=adamw_torch")


def test_sharding_lowers_the_per_gpu_peak_and_ddp_replicates():
    spec = registry.spec("qwen2_5_7b")
    full = _load("model=qwen2_5_7b", "method=full", "distributed=zero3")
    one, four = plan(full, spec, num_gpus=1), plan(full, spec, num_gpus=4)
    assert four.peak_bytes < one.peak_bytes / 2
    zero2 = plan(config.with_overrides(full, ["distributed=zero2"]), spec, num_gpus=4)
    assert zero2.phases["load"]["weights"] > four.phases["load"]["weights"]  # ZeRO-2 keeps every weight
    lora = _load("model=qwen2_5_7b", "method=lora", "distributed=none", "train.grad_accum=4")
    single, ddp = plan(lora, spec, num_gpus=1), plan(lora, spec, num_gpus=2)
    assert ddp.distributed == "ddp"
    assert ddp.phases["backward end"]["gradients"] == 2 * single.phases["backward end"]["gradients"]


def test_zero3_holds_what_its_reuse_distance_keeps_gathered():
    """The shipped zero3.json's stage3_max_reuse_distance (1e9 parameters) keeps a 0.5B model whole at the loss head
    (every module comes back within it); a 7B's lm_head alone (545M, twice) is past it, so only two units are held."""
    from finetune.estimate.activations import dtype_bytes
    from finetune.estimate.memory import gathered_bytes
    from finetune.estimate.params import facts

    for model, whole in (("qwen2_5_0_5b", True), ("qwen2_5_7b", False)):
        recipe, spec = _load(f"model={model}", "method=lora", "distributed=zero3"), registry.spec(model)
        f, b = facts(recipe, spec), dtype_bytes(recipe)
        layer = (f.params_total - f.embedding_params - f.lm_head_params) // f.layers
        units = 2 * max(f.largest_module_params, layer) * b.weight
        held = gathered_bytes(f, b, "zero3")
        assert held == (pytest.approx(f.params_total * b.weight, rel=1e-6) if whole else units), model
        assert gathered_bytes(f, b, "fsdp") == units  # FSDP: the unit in use and the one prefetched


def test_deepspeed_steps_on_an_fp32_copy_of_its_gradient_partition():
    """As the optimizer steps, ZeRO-2 holds the 16-bit gradient partition, its fp32 copy and AdamW's foreach
    temporary of the same size: 6 + 4 bytes a trained parameter over the ranks (measured on 2 CPU ranks)."""
    recipe = _load("model=qwen2_5_7b", "method=full", "distributed=zero2", "train.precision=bf16")
    p = plan(recipe, registry.spec("qwen2_5_7b"), num_gpus=4)
    trained = p.params_trainable
    assert p.phases["optimizer step"]["gradients"] == 6 * (trained // 4)
    assert p.phases["optimizer step"]["optimizer"] - p.phases["backward end"]["optimizer"] == 4 * (trained // 4)

def test_dpo_doubles_the_sequences_and_full_dpo_holds_a_reference_copy():
    spec = registry.spec("qwen2_5_0_5b")
    sft, dpo = (plan(_load("model=qwen2_5_0_5b", "method=full", f"stage={s}"), spec) for s in ("sft", "dpo"))
    assert dpo.phases["load"]["weights"] == sft.phases["load"]["weights"] + 2 * dpo.params_total  # bf16 copy
    assert dpo.phases["loss backward"]["activations"] > 1.9 * sft.phases["loss backward"]["activations"]


def test_llama_3_1_8b_shape_has_its_published_parameter_count():
    bench = _bench()
    assert plan(bench.torchtune_setting("method=full"), bench.llama_3_1_8b()).params_total == 8_030_261_248


COMPARABLE = [row for row in _bench().TORCHTUNE_ROWS if row[3]]


@pytest.mark.parametrize("row", COMPARABLE, ids=[row[0] for row in COMPARABLE])
def test_estimate_reproduces_torchtunes_measured_peak_within_15_percent(row):
    """torchtune's README (its memory table: peak per GPU, measured), in the rows whose settings ours can express (the
    others, and why not, are in docs/memory.md). Their peak is torch's allocator figure: no CUDA context."""
    bench = _bench()
    name, measured_gib, overrides, _, _ = row
    p = plan(bench.torchtune_setting(*overrides), bench.llama_3_1_8b())
    assert (p.peak_bytes - CUDA_CONTEXT_BYTES) / GiB == pytest.approx(measured_gib, rel=0.15)


def test_json_report_has_the_agreed_keys_and_types():
    recipe = config.load("qwen7b_lora", ["train.gradient_checkpointing=false"])
    out = report.estimate_report(recipe, registry.spec("qwen2_5_7b"), [], gpu_mem=24)
    out = json.loads(json.dumps(out))  # it is plain JSON
    assert isinstance(out["params_total"], int) and isinstance(out["params_trainable"], int)
    assert isinstance(out["peak_bytes"], int) and out["peak_bytes"] == sum(out["breakdown"].values())
    assert set(out["breakdown"]) == set(TERMS) and all(isinstance(v, int) for v in out["breakdown"].values())
    assert out["gpus"] == [] and out["fits"] is False
    assert out["suggestions"] and all(set(s) >= {"change", "peak_bytes"} for s in out["suggestions"])


def test_every_suggestion_is_a_replan_that_lowers_the_peak():
    recipe = config.load("qwen7b_lora", ["train.gradient_checkpointing=false", "train.micro_batch=4"])
    spec = registry.spec("qwen2_5_7b")
    out = report.estimate_report(recipe, spec, [], gpu_mem=24)
    changes = [s["change"] for s in out["suggestions"]]
    assert changes[0] == "train.gradient_checkpointing=true"  # the cheapest fix comes first
    for s in out["suggestions"]:
        assert s["peak_bytes"] < out["peak_bytes"]
        changed = config.with_overrides(recipe, s["change"].split())
        assert plan(changed, spec, num_gpus=changed.num_gpus or 1).peak_bytes == s["peak_bytes"]
    assert any(s["fits"] for s in out["suggestions"])


def test_verdict_against_the_gpus_free_memory_and_without_any_gpu():
    recipe = config.load("qwen7b_qlora", [])
    spec = registry.spec("qwen2_5_7b")
    roomy = report.estimate_report(recipe, spec, [GPU(0, "NVIDIA A100 80GB", 80 * GiB, 70 * GiB)], gpu_mem=None)
    assert roomy["fits"] is True and roomy["suggestions"] == [] and roomy["headroom_bytes"] > 0
    busy = report.estimate_report(recipe, spec, [GPU(0, "NVIDIA A100 80GB", 80 * GiB, 2 * GiB)], gpu_mem=None)
    assert busy["fits"] is False and "2.0 GiB free" in busy["verdict"]
    nowhere = report.estimate_report(recipe, spec, [], gpu_mem=None)
    assert nowhere["fits"] is None and "no GPU found" in nowhere["verdict"]
    peak = nowhere["peak_bytes"]
    assert nowhere["fits_on"] == [n for n, gib in sorted(KNOWN_GPUS.items(), key=lambda kv: kv[1])
                                  if gib * GiB >= peak]
    assert "A100 80GB" in nowhere["fits_on"] and "T4 16GB" in nowhere["fits_on"]
    assert "RTX 3060 12GB" not in report.estimate_report(config.load("qwen7b_lora"), spec, [], gpu_mem=None)["fits_on"]


def test_rendered_estimate_and_png_chart(tmp_path):
    recipe = config.load("qwen7b_lora", ["train.gradient_checkpointing=false"])
    out = report.estimate_report(recipe, registry.spec("qwen2_5_7b"), [], gpu_mem=24)
    console = Console(record=True, width=140)
    console.print(report.render_estimate(out))
    text = console.export_text()
    assert "does not fit" in text and "train.gradient_checkpointing=true" in text and "activations" in text
    path = tmp_path / "charts" / "breakdown.png"
    report.save_breakdown_png(out, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["breakdown.png"]  # no temporary left behind


def test_recommend_ranks_what_fits_and_offers_the_chinese_llama_for_chinese():
    rows = recommend.recommend(12, "zh", None)
    assert rows and all(r["peak_bytes"] <= 12 * GiB for r in rows)
    order = [(bool(r["superseded_by"]), -r["params"], recommend.METHODS.index(r["method"])) for r in rows]
    assert order == sorted(order)  # current models first, bigger model first, then full > lora > qlora
    found = {(r["model"], r["variant"], r["method"]) for r in rows}
    assert ("llama2_7b", "zh", "qlora") in found  # English-only Llama-2 comes in through its Chinese variant
    assert not any(r["model"] == "llama2_13b" for r in rows)
    assert all(r["license"] and "commercial use" in r["why"] for r in rows)
    assert all(r["recipe"] in (None, f"{r['model']}_{r['method']}", f"qwen7b_{r['method']}") for r in rows)


def test_recommend_rejects_an_unknown_task():
    with pytest.raises(UserError, match="task=poetry"):
        recommend.recommend(8, None, "poetry")


def test_models_table_lists_every_shipped_model_with_lora_and_qlora_estimates():
    rows = recommend.models_table()
    assert {r["model"] for r in rows} == {n for n, (_, m) in registry.models().items() if not m.tiny}
    for r in rows:
        assert 0 < r["qlora_gib@2048"] < r["lora_gib@2048"]
        assert r["license"] and r["commercial_use"] and r["hf_id"]


def _qwen7b_plan(*overrides: str):
    recipe = _load("model=qwen2_5_7b", "train.micro_batch=1", "train.max_length=2048", *overrides)
    return plan(recipe, registry.spec("qwen2_5_7b"))


def test_full_logits_hold_three_fp32_copies_of_tokens_by_vocabulary():
    """transformers' loss at its peak (log_softmax's backward): the saved log-probabilities, their gradient and
    its own, all fp32 [tokens, vocab] — 3.5 GiB for Qwen2.5's 152k vocabulary at 2048 tokens."""
    chunked, full = (_qwen7b_plan("method=lora", f"train.logits={mode}") for mode in ("chunked", "full"))
    logits = full.phases["loss backward"]["logits"]
    assert logits == 3 * 4 * 2048 * 152_064  # the config's (padded) vocabulary
    assert chunked.phases["loss backward"]["logits"] < logits / 10
    assert full.phases["layer backward"] == chunked.phases["layer backward"]  # the decoder is the same


def test_upcast_makes_every_16_bit_part_of_a_qlora_model_fp32():
    kept, upcast = (_qwen7b_plan("method=qlora", f"quant.upcast={flag}") for flag in ("false", "true"))
    quantized = 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944)  # q, o; k, v; gate, up, down
    not_quantized = 7_615_616_512 - quantized  # embeddings, lm_head, norms, biases
    assert upcast.phases["load"]["weights"] - kept.phases["load"]["weights"] == 2 * not_quantized
    assert upcast.phases["loss backward"]["activations"] > kept.phases["loss backward"]["activations"]  # fp32 stream
    lora = _qwen7b_plan("method=lora", "quant.upcast=true")
    assert lora.peak_bytes == _qwen7b_plan("method=lora").peak_bytes  # only QLoRA is upcast


def test_eager_attention_keeps_scores_that_grow_with_the_square_of_the_length():
    def layers(attn: str, length: int) -> int:
        return _qwen7b_plan("method=lora", f"train.attn_implementation={attn}",
                            f"train.max_length={length}").phases["layer backward"]["activations"]

    assert layers("eager", 4096) / layers("eager", 2048) > 3  # s² dominates
    assert layers("sdpa", 4096) / layers("sdpa", 2048) < 2.1  # linear in the length
    assert layers("flash_attention_2", 2048) == layers("sdpa", 2048)


def test_without_checkpointing_forward_is_a_moment_of_its_own():
    off = _qwen7b_plan("method=lora", "train.gradient_checkpointing=false")
    on = _qwen7b_plan("method=lora", "train.gradient_checkpointing=true")
    assert "forward" in off.phases and "forward" not in on.phases
    assert off.phases["forward"]["activations"] > off.phases["loss backward"]["activations"]


def test_compare_plans_the_plain_stack_and_says_what_each_term_rests_on():
    spec = registry.spec("qwen2_5_7b")
    out = report.estimate_report(config.load("qwen7b_qlora", []), spec, [], gpu_mem=24, compare=True)
    plain = plan(config.with_overrides(config.load("qwen7b_qlora", []), ["train.logits=full", "quant.upcast=true"]),
                 spec)
    assert out["compare"]["peak_bytes"] == plain.peak_bytes > out["peak_bytes"]
    assert out["compare"]["breakdown"] == plain.breakdown and set(plain.breakdown) == set(TERMS)
    assert out["basis"]["overhead"].startswith("assumed") and "CPU-measured" in out["basis"]["activations"]
    dpo = config.load("tiny_qwen2_5_dpo", [])
    assert report.plain_stack(dpo) == ["quant.upcast=true"]  # DPO scores tokens its own way
    console = Console(record=True, width=160)
    console.print(report.render_estimate(out))
    text = console.export_text()
    assert "plain stack" in text and "assumed: CUDA context" in text


def test_full_logits_are_for_sft_only():
    with pytest.raises(UserError, match="train.logits=full is for stage=sft"):
        config.load("tiny_qwen2_5_dpo", ["train.logits=full"])
