"""4-bit AWQ for vLLM with llm-compressor, calibrated on the run's own training data.

Output: a compressed-tensors checkpoint (W4A16, symmetric int4 packed in int32, group 128), the format vLLM loads
natively for the architectures it knows by name — Qwen2ForCausalLM, LlamaForCausalLM, GlmForCausalLM. Our
Baichuan2-13B ALiBi class is not one of them (vLLM runs Baichuan only in its original remote-code layout), so
that family is refused here; serve its un-merged adapter or its GGUF instead. Symmetric W4A16 is chosen because it
also loads back in transformers, equal to the quantized model in memory: llm-compressor's W4A16_ASYM checkpoint
loads in transformers 5.17 but fails in 5.23 (a zero-point shape error in its compressed-tensors loader).
vLLM itself cannot run on this CPU machine: the printed `vllm serve` lines are what to run on a GPU server.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from finetune import atomic
from finetune.errors import UserError
from finetune.export.merge import copy_tokenizer
from finetune.rundir import RunDir

SCHEME = "W4A16"
GROUP = 128
CALIBRATION_SAMPLES = 64
VLLM_ARCHS = ("Qwen2ForCausalLM", "LlamaForCausalLM", "GlmForCausalLM")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank


def _mappings(arch: str):
    """AWQ smoothing groups: llm-compressor's defaults, except GLM's fused gate_up_proj (as its Phi-3 mapping)."""
    from llmcompressor.modifiers.transform.awq.mappings import AWQMapping

    if arch != "GlmForCausalLM":
        return None
    return [AWQMapping("re:.*input_layernorm$", ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]),
            AWQMapping("re:.*v_proj$", ["re:.*o_proj$"]),
            AWQMapping("re:.*post_attention_layernorm$", ["re:.*gate_up_proj$"]),
            AWQMapping("re:.*gate_up_proj$", ["re:.*down_proj$"])]


def _no_pin_memory() -> None:
    """llm-compressor 0.14 pins cached activations with Tensor.pin_memory(), which raises on CPU-only torch (no
    accelerator to pin for). Pinning only speeds up host→GPU copies, so on CPU skipping it changes nothing else."""
    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def calibration(run: RunDir, tokenizer, samples: int, max_len: int):
    """Up to `samples` rendered training examples (first max_len tokens), exactly as the trainer saw them."""
    from datasets import Dataset

    from finetune import data

    rows = data.build(run.recipe(), tokenizer, run.base().template)["train"]
    rows = rows.select(range(min(samples, len(rows))))
    ids = [r[:max_len] for r in rows["input_ids"]]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def _perplexity(model, sequences: list[list[int]]) -> float:
    from finetune.export.verify import nll

    total = count = 0.0
    with torch.inference_mode():
        for ids in sequences:
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            total += nll(logits, ids)
            count += len(ids) - 1
    return math.exp(total / count)


def export(run: RunDir, merged: Path, dst: Path, *, force: bool = False, samples: int = CALIBRATION_SAMPLES,
           max_length: int = 512) -> Path:
    """dst/ = AWQ W4A16 of the merged model + tokenizer + report.json, atomically; reused unless `force`.
    Calibration costs samples × max_length per smoothing step (64 × 512: minutes on a GPU, far more on CPU)."""
    if dst.is_dir() and not force:
        return dst
    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
    except ImportError as exc:
        raise UserError(f"AWQ export needs llm-compressor ({exc}): pip install 'finetune[awq]'") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((merged / "config.json").read_text())
    arch = config["architectures"][0]
    if arch not in VLLM_ARCHS:
        raise UserError(f"AWQ is for vLLM, which has no {arch}; export this run to=gguf/ollama, or serve the "
                        f"un-merged adapter")
    sizes = {k: config[k] for k in ("hidden_size", "intermediate_size") if k in config}
    if any(v % GROUP for v in sizes.values()):
        raise UserError(f"AWQ quantizes in groups of {GROUP} input features; this model has {sizes}")
    _no_pin_memory()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    max_len = min(max_length, run.recipe().train.max_length)
    calib = calibration(run, tokenizer, samples, max_len)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    held_out = [ids[:128] for ids in calib["input_ids"][-4:]]
    ppl_before = _perplexity(model, held_out)
    start = time.time()
    oneshot(model=model, dataset=calib, num_calibration_samples=len(calib), max_seq_length=max_len,
            recipe=[AWQModifier(duo_scaling="both", mappings=_mappings(arch)),
                    QuantizationModifier(targets=["Linear"], scheme=SCHEME, ignore=["lm_head"])])
    seconds = time.time() - start
    ppl_after = _perplexity(model, held_out)
    with atomic.directory(dst, replace=True) as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        copy_tokenizer([merged], tmp)
        atomic.write_json(tmp / "report.json", {
            "scheme": SCHEME, "group_size": GROUP, "format": "compressed-tensors (pack-quantized)",
            "calibration_samples": len(calib), "max_seq_length": max_len, "seconds": round(seconds, 1),
            "perplexity_merged": ppl_before, "perplexity_awq": ppl_after, "perplexity_ratio": ppl_after / ppl_before,
            "note": "perplexity on the last calibration sequences (first 128 tokens), in-memory quantized model"})
    return dst


def serve_commands(run: RunDir, awq_dir: Path) -> list[str]:
    """The `vllm serve` lines: the AWQ model, and the base with the un-merged adapter (--enable-lora)."""
    recipe = run.recipe()
    lines = [f"vllm serve {awq_dir.resolve()} --max-model-len {recipe.train.max_length}"]
    if run.has_adapter:
        base = run.base().directory.resolve()
        rank = next((r for r in VLLM_LORA_RANKS if r >= recipe.lora.r), VLLM_LORA_RANKS[-1])
        lines.append(f"vllm serve {base} --enable-lora --max-lora-rank {rank} "
                     f"--lora-modules finetuned={run.adapter_dir.resolve()} --max-model-len {recipe.train.max_length}")
    return lines
