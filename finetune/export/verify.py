"""Check a GGUF against the merged HF model it came from, on held-out sequences, and say so in a short report.

Why teacher forcing and token ids: both models read exactly the same ids (no tokenizer in the loop), so any
difference is the export's — a wrong eps, a missing position encoding, a mis-permuted head — not text handling.
- f16 (and bf16) must match: the same greedy continuation from each prompt and the same top-1 next token at every
  position of every sequence. Anything less means the conversion changed the model. One allowance, counted
  apart: where HF's two best logits are closer than TIE (below what 16-bit weights and llama.cpp's f16
  activations can resolve, ~3e-3–8e-3 measured), llama.cpp picking the runner-up is a tie, not an error. A wrong
  conversion (eps, position encoding, head layout) moves logits by far more and fails.
- quantized types are lossy by design: the report gives top-1 agreement and the perplexity ratio (GGUF / HF) over
  the same positions, which is how much the quantization costs.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from finetune import atomic
from finetune.export.llamacpp import require_llama_cpp

EXACT_TYPES = ("f16", "bf16", "f32")
TIE = 0.02  # logits closer than this are a tie at 16-bit precision


@dataclass(frozen=True)
class Sample:
    prompt: list[int]  # an inference prompt (ends where the answer would start)
    text: list[int]  # a full held-out sequence, for per-position comparison and perplexity


@dataclass(frozen=True)
class Check:
    file: str
    quant: str
    positions: int
    top1_agreement: float  # same top-1 token
    top1_ties: int  # positions where the top-1 differs only within TIE of HF's best logit
    greedy_equal: int  # prompts whose greedy continuation is identical
    greedy_ties: int  # prompts whose continuations part at a tie (then the contexts differ: not compared further)
    prompts: int
    max_abs_logit_diff: float
    ppl_hf: float
    ppl_gguf: float

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_gguf / self.ppl_hf

    @property
    def exact(self) -> bool:
        return self.quant in EXACT_TYPES

    @property
    def passed(self) -> bool:
        """Exact types must agree everywhere; quantized ones only have to load, generate and stay sane."""
        if self.exact:
            return (self.top1_agreement * self.positions + self.top1_ties == self.positions
                    and self.greedy_equal + self.greedy_ties == self.prompts)
        return math.isfinite(self.ppl_gguf)


def nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed negative log-likelihood of ids[1:] given logits[:-1] (float64, stable log-softmax)."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def reference_dtype(merged_dir: Path) -> torch.dtype:
    """fp32 when twice the 16-bit checkpoint fits in half the available memory (exact reference), else the
    checkpoint's own 16-bit type (a 7B in fp32 would need 28 GB): a real model's top-1 margins survive that."""
    import psutil

    size16 = sum(f.stat().st_size for f in Path(merged_dir).glob("*.safetensors"))
    if 2 * size16 < psutil.virtual_memory().available / 2:
        return torch.float32
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(merged_dir).dtype or torch.bfloat16


class HFReference:
    """The merged model (fp32 when memory allows): per-position logits and greedy continuations."""

    def __init__(self, merged_dir: Path):
        from transformers import AutoModelForCausalLM

        import finetune.models.native  # noqa: F401

        self.dtype = reference_dtype(merged_dir)
        self.model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=self.dtype).eval()

    @cache
    @torch.inference_mode()
    def logits(self, ids: tuple[int, ...]) -> np.ndarray:
        return self.model(torch.tensor([ids])).logits[0].float().numpy()

    @cache
    @torch.inference_mode()
    def greedy(self, prompt: tuple[int, ...], n: int) -> tuple[list[int], list[np.ndarray]]:
        """n greedy tokens, and the logits each was chosen from (cached: every GGUF is compared to the same)."""
        out, steps, past, step = [], [], None, torch.tensor([prompt])
        for _ in range(n):
            res = self.model(step, past_key_values=past, use_cache=True)
            past = res.past_key_values
            steps.append(res.logits[0, -1].float().numpy())
            out.append(int(steps[-1].argmax()))
            step = torch.tensor([[out[-1]]])
        return out, steps


class GGUFModel:
    """A GGUF file in llama.cpp with logits for every position (what Ollama would run)."""

    def __init__(self, path: Path, n_ctx: int):
        llama_cpp = require_llama_cpp()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                                   n_threads=os.cpu_count() or 1, n_batch=n_ctx)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out


def _is_tie(hf_logits: np.ndarray, other_choice: int) -> bool:
    return bool(hf_logits[other_choice] >= hf_logits.max() - TIE)


def compare(reference: HFReference, gguf: Path, quant: str, samples: list[Sample], new_tokens: int = 12) -> Check:
    n_ctx = max(max(len(s.text), len(s.prompt) + new_tokens) for s in samples) + 8
    model = GGUFModel(gguf, n_ctx)
    agree = ties = positions = greedy_equal = greedy_ties = 0
    nll_hf = nll_gguf = max_diff = 0.0
    for sample in samples:
        hf, gg = reference.logits(tuple(sample.text)), model.logits(sample.text)
        vocab = min(hf.shape[1], gg.shape[1])
        hf, gg = hf[:, :vocab], gg[:, :vocab]
        same = hf.argmax(1) == gg.argmax(1)
        agree += int(same.sum())
        ties += sum(_is_tie(hf[i], int(gg[i].argmax())) for i in np.flatnonzero(~same))
        positions += len(sample.text)
        max_diff = max(max_diff, float(np.abs(hf - gg).max()))
        nll_hf += nll(hf, sample.text)
        nll_gguf += nll(gg, sample.text)
        want, steps = reference.greedy(tuple(sample.prompt), new_tokens)
        got = model.greedy(sample.prompt, new_tokens)
        split = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        greedy_equal += split is None
        greedy_ties += split is not None and _is_tie(steps[split], got[split])
    predicted = sum(len(s.text) - 1 for s in samples)
    return Check(file=gguf.name, quant=quant, positions=positions, top1_agreement=agree / positions,
                 top1_ties=ties, greedy_equal=greedy_equal, greedy_ties=greedy_ties, prompts=len(samples),
                 max_abs_logit_diff=max_diff, ppl_hf=math.exp(nll_hf / predicted),
                 ppl_gguf=math.exp(nll_gguf / predicted))


def report(checks: list[Check], out_dir: Path, reference_dtype: torch.dtype = torch.float32) -> Path:
    """verify.md (for people) and verify.json (for tools) next to the GGUF files."""
    rows = [f"| {c.file} | {c.quant} | {c.top1_agreement:.3f} of {c.positions} (+{c.top1_ties} ties) | "
            f"{c.greedy_equal}/{c.prompts} (+{c.greedy_ties} ties) | {c.max_abs_logit_diff:.2e} | {c.ppl_ratio:.4f} | "
            f"{'PASS' if c.passed else 'FAIL'} |" for c in checks]
    text = "\n".join([
        f"# GGUF verification against the merged HF model ({str(reference_dtype).removeprefix('torch.')})",
        "",
        "Same token ids into both models (teacher forcing on held-out sequences, then greedy from their prompts).",
        f"f16/bf16 must agree everywhere (a tie: HF's logits for both tokens within {TIE}); quantized files report",
        "agreement and the perplexity ratio (GGUF / HF).",
        "",
        "| file | type | top-1 agreement | greedy equal | max abs logit diff | perplexity ratio | result |",
        "|---|---|---|---|---|---|---|",
        *rows, ""])
    atomic.write_json(out_dir / "verify.json",
                      [{**asdict(c), "ppl_ratio": c.ppl_ratio, "passed": c.passed} for c in checks])
    return atomic.write_text(out_dir / "verify.md", text)
