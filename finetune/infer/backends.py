"""The three ways to run a model, each reduced to one generator: prompt ids in, generated ids out; `load` puts the
one `backend=` names under an Engine.

- transformers (+ PEFT): the default, works on a CPU. Several adapters sit on one base (PEFT's named adapters);
  each request selects its own (`set_adapter`), or the bare base (`disable_adapter`). Callers run one generation
  at a time (the server's lock), so switching adapters is safe.
- gguf: llama.cpp (llama-cpp-python, the pinned build) on the run's exported GGUF: what Ollama will run.
- vllm: when vLLM is installed (a Linux CUDA machine), adapters as LoRA requests. Its offline `LLM.generate` is
  not incremental, so a streamed answer arrives in one piece.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import torch

from finetune.errors import UserError
from finetune.export.llamacpp import require_llama_cpp
from finetune.infer.generate import Engine, Sampling
from finetune.infer.load import Source, device_and_dtype
from finetune.infer.options import LoadOptions
from finetune.models import chat

CONTEXT_KEYS = ("max_position_embeddings", "seq_length", "model_max_length", "n_positions")
GGUF_MAX_CONTEXT = 8192
"""llama.cpp allocates its KV cache for the whole context up front; a 32k-token Qwen2.5 cache would take GBs."""


@cache
def gguf_trained_context(path: Path) -> Optional[int]:
    """The context length a GGUF's model was trained for (`<arch>.context_length`), read from its metadata by a
    vocab-only load with no context. A vocab-only `Llama` also creates a 512-token context, and llama.cpp warns that
    it overflows a trained context of 0 (a vocab-only load reads no hyperparameters). `_internals.LlamaModel` is the
    model half of `Llama` (quiet with verbose=False, as `Llama` is), stable here: the build is pinned."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        model = llama_cpp._internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    except ValueError as exc:
        raise UserError(f"{path}: llama.cpp cannot read it as a GGUF model ({exc}); export it again") from None
    try:
        metadata = model.metadata()
    finally:
        model.close()
    context = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    return int(context) if context else None


def gguf_window(path: Path) -> int:
    """The context llama.cpp runs the GGUF with: what it was trained for, at most GGUF_MAX_CONTEXT."""
    return min(gguf_trained_context(path) or GGUF_MAX_CONTEXT, GGUF_MAX_CONTEXT)


def pick(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> int:
    """The next token: argmax at temperature 0, else a draw from the tempered distribution cut to top_p.
    The draw inverts the cumulative distribution (one uniform number): torch.multinomial over a 150k vocabulary
    takes ~30 ms per token on a CPU, more than a tiny model's whole forward pass."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs, order = torch.softmax(logits.float() / sampling.temperature, dim=-1), None
    if sampling.top_p < 1:
        probs, order = probs.sort(descending=True)
        keep = probs.cumsum(0) - probs < sampling.top_p  # the smallest set reaching top_p (never empty)
        probs, order = probs[keep], order[keep]
    cdf = probs.cumsum(0)
    u = torch.rand(1, generator=generator, device=cdf.device) * cdf[-1]
    i = min(int(torch.searchsorted(cdf, u)), len(cdf) - 1)
    return int(order[i]) if order is not None else i


class TransformersBackend:
    def __init__(self, source: Source, device: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        import finetune.models.native  # noqa: F401  (registers the native classes, e.g. Baichuan2-13B's ALiBi)

        model = AutoModelForCausalLM.from_pretrained(source.weights, dtype=dtype, device_map=device)
        self.adapters = list(source.adapters)
        if self.adapters:
            from peft import PeftModel

            first, *rest = self.adapters
            model = PeftModel.from_pretrained(model, source.adapters[first], adapter_name=first)
            for name in rest:
                model.load_adapter(source.adapters[name], adapter_name=name)
        self.model, self.device = model.eval(), device
        config = model.config
        self.context_length = next((int(getattr(config, k)) for k in CONTEXT_KEYS if getattr(config, k, None)), 4096)

    def _use(self, model: str) -> AbstractContextManager:
        if model in self.adapters:
            self.model.set_adapter(model)
            return nullcontext()
        return self.model.disable_adapter() if self.adapters else nullcontext()

    @torch.inference_mode()
    def tokens(self, prompt: list[int], sampling: Sampling, model: str) -> Generator[int, None, None]:
        generator = None
        if sampling.seed is not None and sampling.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        with self._use(model):
            step, past = torch.tensor([prompt], device=self.device), None
            for _ in range(sampling.max_tokens):
                out = self.model(input_ids=step, past_key_values=past, use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                token = pick(out.logits[0, -1], sampling, generator)
                yield token
                step = torch.tensor([[token]], device=self.device)


def gguf_file(source: Source, quant: Optional[str]) -> Path:
    """The run's exported GGUF: model-<quant>.gguf when quant= is given, else the latest quantized export (what
    Ollama runs), else model-f16.gguf."""
    if source.run is None:
        raise UserError("backend=gguf runs a run's exported GGUF: pass run=outputs/<run> (after `finetune export`)")
    folder = source.run.export_dir("gguf")
    files = sorted(folder.glob("model-*.gguf"))
    export = f"finetune export run={source.run.path} to=gguf"
    if not files:
        raise UserError(f"{source.run.path} has no GGUF export ({folder}/model-*.gguf); run `{export}` first")
    if quant:
        wanted = folder / f"model-{quant}.gguf"
        if not wanted.is_file():
            have = ", ".join(f.stem.removeprefix("model-") for f in files)
            raise UserError(f"no {wanted.name} in {folder} (exported: {have}); run `{export} quant={quant}`")
        return wanted
    quantized = [f for f in files if f.name != "model-f16.gguf"]
    return max(quantized or files, key=lambda f: f.stat().st_mtime)


class GGUFBackend:
    def __init__(self, source: Source, quant: Optional[str]):
        self.path = gguf_file(source, quant)
        if any(path != source.run.adapter_dir for path in source.adapters.values()):  # type: ignore[union-attr]
            raise UserError("backend=gguf runs one merged GGUF; adapters= needs backend=transformers (or vllm)")
        llama_cpp = require_llama_cpp()
        self.context_length = gguf_window(self.path)
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.context_length, verbose=False,
                                   n_threads=os.cpu_count() or 1)

    def tokens(self, prompt: list[int], sampling: Sampling, model: str) -> Generator[int, None, None]:
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed)
        # top_k=0 / min_p=0 / repeat_penalty=1: llama.cpp's own defaults off, so the request's settings are all
        stream = self.llm.generate(prompt, temp=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0,
                                   repeat_penalty=1.0, reset=True)
        yield from islice(stream, sampling.max_tokens)


class VLLMBackend:
    def __init__(self, source: Source, dtype: str, stop_ids: list[int]):
        from vllm import LLM  # load.resolve said so already where it is not installed
        from vllm.lora.request import LoRARequest

        ranks = [json.loads((p / "adapter_config.json").read_text())["r"] for p in source.adapters.values()]
        dtypes = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
        self.llm: Any = LLM(model=str(source.weights), tokenizer=str(source.tokenizer), dtype=dtypes[dtype],
                            enable_lora=bool(ranks), max_lora_rank=max(ranks, default=16),
                            max_loras=max(1, len(ranks)))
        self.loras = {name: LoRARequest(name, i, str(path)) for i, (name, path) in
                      enumerate(source.adapters.items(), 1)}
        self.stop_ids = stop_ids
        self.context_length = self.llm.llm_engine.model_config.max_model_len

    def tokens(self, prompt: list[int], sampling: Sampling, model: str) -> Generator[int, None, None]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                                max_tokens=sampling.max_tokens, stop_token_ids=self.stop_ids,
                                include_stop_str_in_output=True, skip_special_tokens=False)
        out = self.llm.generate({"prompt_token_ids": prompt}, params, lora_request=self.loras.get(model),
                                use_tqdm=False)
        yield from out[0].outputs[0].token_ids


def load(source: Source, options: LoadOptions) -> Engine:
    """The Engine for `source` on the chosen backend (its memory need printed by the caller first)."""
    from transformers import AutoTokenizer  # (seconds of imports: only once something is loaded)

    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer)
    backend: Any
    if options.backend == "gguf":
        backend = GGUFBackend(source, options.quant)
    elif options.backend == "vllm":
        backend = VLLMBackend(source, options.dtype, chat.get(source.template).stop_token_ids(tokenizer))
    else:
        backend = TransformersBackend(source, *device_and_dtype(options))
    return Engine(backend, tokenizer, source.template, source.models, system=source.system)
