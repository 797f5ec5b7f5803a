"""What a model needs to answer, said before loading it: weights + adapters + the KV cache of a full context.

Parameter counts and shapes come from the estimator's exact facts (finetune.estimate.params: counted on the
meta-device module tree, cached, seeded for shipped models), so `chat` and `serve` agree with `finetune estimate`
on what the weights are. Inference has no optimizer, gradients or activations to keep: the terms are the weights
in the dtype they are loaded in (a GGUF: its file), the adapters (their files) and keys + values for every layer
at the whole context, the most a conversation can grow to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from finetune import config
from finetune.estimate import gpu, params
from finetune.estimate.gpu import GiB
from finetune.models import registry
from finetune.infer.load import Source, device_and_dtype
from finetune.infer.options import LoadOptions


def _facts(source: Source):
    name = source.registry_name
    spec = registry.known_spec(name or "")
    if spec is None:
        return None, None
    return params.facts(config.load(None, [f"model={spec.name}", "method=full"]), spec), spec.context_length


def _size(*files: Path) -> int:
    return sum(f.stat().st_size for f in files if f.is_file())


def plan(source: Source, options: LoadOptions) -> tuple[dict[str, int], str, int]:
    """({term: bytes}, where it runs: "cpu" or a CUDA device, context tokens the KV term is for)."""
    facts, context = _facts(source)
    if options.backend == "gguf":
        from finetune.infer.backends import gguf_file, gguf_window  # (torch: only for backend=gguf)

        path = gguf_file(source, options.quant)
        weights, weight_bytes, kv_bytes, where, context = _size(path), None, 2, "cpu", gguf_window(path)
    else:
        where, dtype = device_and_dtype(options)
        weight_bytes = kv_bytes = dtype.itemsize
        weights = (facts.params_total * weight_bytes + facts.buffer_bytes if facts
                   else _size(*source.weights.glob("*.safetensors")))
    terms = {"weights": weights,
             "adapters": _size(*(p / "adapter_model.safetensors" for p in source.adapters.values()))}
    if facts and context:
        terms["kv_cache"] = 2 * facts.layers * facts.kv_heads * facts.head_dim * context * kv_bytes
    return {k: v for k, v in terms.items() if v}, where, context or 0


def describe(source: Source, options: LoadOptions) -> str:
    """One line for stderr: the need, its terms, and whether the device has that much free."""
    terms, where, context = plan(source, options)
    total = sum(terms.values())
    names = {"weights": "weights", "adapters": "adapters", "kv_cache": f"KV cache of a full {context:,}-token context"}
    parts = " + ".join(f"{names[k]} {v / GiB:.2f}" for k, v in terms.items())
    free, device = _free(where)
    verdict = "" if free is None else (f"; {device} has {free / GiB:.1f} GiB free: "
                                       f"{'fits' if total <= free else 'does NOT fit, loading may fail'}")
    note = _window_note(source, options, context)
    return f"memory: needs ~{total / GiB:.2f} GiB on {where} ({parts} GiB){verdict}{note}"


def _window_note(source: Source, options: LoadOptions, context: int) -> str:
    """Why backend=gguf plans a shorter context than the model's (and than backend=transformers, which grows its
    cache as a conversation does): llama.cpp reserves its whole window at load."""
    if options.backend != "gguf":
        return ""
    from finetune.infer.backends import gguf_file, gguf_trained_context  # (torch)

    trained = gguf_trained_context(gguf_file(source, options.quant))
    return (f"; the model was trained for a {trained:,}-token context, llama.cpp runs it in a window of {context:,} "
            f"tokens (reserved whole at load)" if trained and trained > context else "")


def _free(where: str) -> tuple[Optional[int], str]:
    if where == "cpu":
        import psutil

        return psutil.virtual_memory().available, "RAM"
    index = int(where.split(":")[1]) if ":" in where else 0
    found = [g for g in gpu.detect() if g.index == index]
    return (found[0].free_bytes, found[0].name) if found else (None, where)
