"""Does each GGUF behave like the fine-tuned model, and did the fine-tune survive the export?

Users of every toolkit report "my fine-tuned model in Ollama acts like the base model": quantizing merged weights
can round a small LoRA delta away (seen on a real Qwen2.5-0.5B: q4_k_m answered 3 of 3 trained questions as the
base did, while f16 and base-q4_k_m + adapter-f16 answered as trained). A check that only asks whether a file loads
and gives a finite perplexity cannot see that. So every GGUF route (a merged file, or a base file + a LoRA GGUF)
answers three questions, with the same token ids going into every model (no tokenizer in the loop):

1. The fine-tune survived. On prompts the run trained on, greedy answers of the fine-tuned model (merged, in
   transformers), of the base model, and of the route. Where the fine-tune changed the answer decisively (the
   fine-tuned model prefers its token by ≥ DECISIVE logits where the two answers part), the route's answer must be
   closer (token-sequence similarity) to the fine-tuned one than to the base's on at least KEPT_MIN of them.
   `retained` is the share of the fine-tune's log-likelihood gain on the trained answers that the route keeps:
   (NLL_base − NLL_route) / (NLL_base − NLL_tuned), teacher-forced.
2. Quality on general text nobody trained on (finetune/samples/general_zh_en.txt): perplexity of the merged model
   and of the route, and per position the KL divergence from the merged model's next-token distribution and
   whether the top-1 token agrees — the figures llama.cpp's `perplexity --kl-divergence` reports for quant types.
3. 16-bit (f16/bf16) and f32 files are conversions, not approximations: the same top-1 token at every position and
   the same greedy answers. One allowance, counted apart: where the reference's two best logits are closer than TIE
   (below what 16-bit weights and llama.cpp's f16 activations resolve), picking the runner-up is a tie, not an error.
   A wrong conversion (eps, position encoding, head layout) moves logits by far more and fails.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from finetune import atomic
from finetune.export.llamacpp import native_notes_silenced, require_llama_cpp

EXACT_TYPES = ("f16", "bf16", "f32")
TIE = 0.05  # reference logits closer than this are a tie at 16-bit precision (0.5B real model: f16 drift ≤ 0.03)
KEPT_MIN = 0.8  # share of the fine-tune's changed answers a route must keep
DECISIVE = 1.0  # logits by which the fine-tuned model must prefer its own answer where it parts from the base's
PPL_RATIO_MAX = 1.25  # perplexity on general text at most 25% above the merged model's
KLD_MAX = 0.15  # mean KL divergence (nats per token) from the merged model on general text
TOP1_MIN = 0.80  # the merged model's top-1 token kept at 80% of general-text positions
NEW_TOKENS = 40  # greedy tokens per answer (the trained answers of a typical identity set are shorter)
LARGER_DELTA = "train a larger delta (train.lr, lora.r, more steps)"
THRESHOLDS = (f"fine-tune kept on ≥ {KEPT_MIN:.0%} of the prompts whose answer it changed (by ≥ {DECISIVE} logits "
              f"where the answers part); perplexity ratio ≤ {PPL_RATIO_MAX}, mean KL divergence ≤ {KLD_MAX} nats, "
              f"top-1 agreement (ties counted) ≥ {TOP1_MIN:.0%} on general text; "
              f"16-bit files: every top-1 token and every greedy answer equal (ties within {TIE} excepted)")


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # an inference prompt (ends where the answer starts)
    answer: list[int] = field(default_factory=list)  # the trained answer's label ids (empty: not from the data)


@dataclass(frozen=True)
class Route:
    """What Ollama would run: one GGUF file, or a base GGUF with a LoRA GGUF applied."""

    model: Path
    quant: str
    adapter: Optional[Path] = None

    @property
    def file(self) -> str:
        return (self.adapter or self.model).name

    @property
    def label(self) -> str:
        return f"{self.model.name} + {self.adapter.name}" if self.adapter else self.model.name


@dataclass(frozen=True)
class Check:
    file: str  # the route's own file in the gguf folder (the adapter for a base + adapter route)
    route: str  # what is loaded: "model-q4_k_m.gguf" or "base-q4_k_m.gguf + adapter-f16.gguf"
    quant: str
    positions: int
    top1_agreement: float
    top1_ties: int
    kld_mean: float
    ppl_merged: float
    ppl_gguf: float
    prompts: int
    changed: int  # prompts whose greedy answer the fine-tune changed (fine-tuned ≠ base)
    kept: int  # of those, answered closer to the fine-tuned model than to the base
    retained: Optional[float]  # share of the trained answers' log-likelihood gain kept (None: no trained answers)
    greedy_equal: int
    greedy_ties: int
    max_abs_logit_diff: float
    failures: list[str]

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_gguf / self.ppl_merged

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def lost_finetune(self) -> bool:
        return bool(self.changed) and self.kept < KEPT_MIN * self.changed

    @property
    def fix(self) -> Optional[str]:
        """What keeps the fine-tune when this route lost it (None otherwise), the one text verify.md and the
        export's summary print. The adapter route is offered to a merged file only (a base + adapter route is it)."""
        if not self.lost_finetune:
            return None
        adapter = [] if self.file != self.route else [
            "for a LoRA run the base GGUF + f16 adapter route (Modelfile.adapter: keeps the fine-tune's delta exact)"]
        return ", or ".join(["quant=q8_0 or quant=q6_k (a larger type rounds the delta less)", *adapter,
                             LARGER_DELTA])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """In float64 (a KL divergence of two close distributions is a small difference of large sums), through torch:
    its vectorized, multi-threaded exp takes a fifth of numpy's time over a [tokens, 152k] array."""
    return torch.from_numpy(np.asarray(logits)).double().log_softmax(-1).numpy()


def nll(logits: np.ndarray, targets: list[int], start: int = 1) -> float:
    """Summed negative log-likelihood of targets[start:] given logits[start-1:-1]."""
    logp = log_softmax(logits[start - 1:len(targets) - 1])
    return float(-logp[np.arange(len(logp)), targets[start:]].sum())


def reference_dtype(merged_dir: Path) -> torch.dtype:
    """fp32 when twice the 16-bit checkpoint fits in a quarter of the available memory (the base is loaded too),
    else the checkpoint's own 16-bit type (a 7B in fp32 would need 28 GB): a real model's margins survive that."""
    import psutil

    size16 = sum(f.stat().st_size for f in Path(merged_dir).glob("*.safetensors"))
    if 2 * size16 < psutil.virtual_memory().available / 4:
        return torch.float32
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(merged_dir).dtype or torch.bfloat16


class HFModel:
    """A checkpoint in transformers: logits for every position, greedy answers with the logits each came from."""

    def __init__(self, path: Path, dtype: torch.dtype, stop_ids: list[int]):
        from transformers import AutoModelForCausalLM

        import finetune.models.native  # noqa: F401

        self.dtype, self.stop = dtype, set(stop_ids)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model(torch.tensor([ids])).logits[0].float().numpy()

    @torch.inference_mode()
    def greedy(self, prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
        out, steps, past, step = [], [], None, torch.tensor([prompt])
        for _ in range(NEW_TOKENS):
            res = self.model(step, past_key_values=past, use_cache=True)
            past = res.past_key_values
            steps.append(res.logits[0, -1].float().numpy())
            out.append(int(steps[-1].argmax()))
            if out[-1] in self.stop:
                break
            step = torch.tensor([[out[-1]]])
        return out, steps


class GGUFModel:
    """A route in llama.cpp with logits for every position (what Ollama would run). It uses torch's thread count
    (OMP_NUM_THREADS where set): llama.cpp's workers spin while they wait, so more threads than the process may
    use turn every other job on the machine, and this one, to a crawl."""

    def __init__(self, route: Route, n_ctx: int, stop_ids: list[int]):
        llama_cpp = require_llama_cpp()
        extra = {"lora_path": str(route.adapter)} if route.adapter else {}
        self.stop = set(stop_ids)
        with native_notes_silenced():
            self.llm = llama_cpp.Llama(model_path=str(route.model), n_ctx=n_ctx, logits_all=True, verbose=False,
                                       n_threads=torch.get_num_threads(), n_batch=n_ctx, **extra)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt: list[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        out: list[int] = []
        for _ in range(NEW_TOKENS):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            if out[-1] in self.stop:
                break
            self.llm.eval([out[-1]])
        return out


@dataclass
class Reference:
    """What the merged (fine-tuned) and base models say, computed once and held against every route."""

    text: list[list[int]]
    prompts: list[Prompt]
    text_logp: list[np.ndarray]  # merged model's log-softmax per general-text chunk
    tuned: list[list[int]]  # merged model's greedy answers
    tuned_steps: list[list[np.ndarray]]
    base: list[list[int]]  # base model's greedy answers
    answer_nll_tuned: list[float]
    answer_nll_base: list[float]
    stop_ids: list[int]
    dtype: torch.dtype

    @classmethod
    def build(cls, merged: Path, base: Path, text: list[list[int]], prompts: list[Prompt],
              stop_ids: list[int]) -> "Reference":
        dtype = reference_dtype(merged)
        scored = [p for p in prompts if p.answer]
        base_model = HFModel(base, dtype, stop_ids)  # one model in memory at a time
        base_answers = [base_model.greedy(p.ids)[0] for p in prompts]
        base_nll = [_answer_nll(base_model.logits, p) for p in scored]
        del base_model
        tuned_model = HFModel(merged, dtype, stop_ids)
        greedy = [tuned_model.greedy(p.ids) for p in prompts]
        return cls(text=text, prompts=prompts, text_logp=[log_softmax(tuned_model.logits(c)) for c in text],
                   tuned=[g[0] for g in greedy], tuned_steps=[g[1] for g in greedy], base=base_answers,
                   answer_nll_tuned=[_answer_nll(tuned_model.logits, p) for p in scored],
                   answer_nll_base=base_nll, stop_ids=stop_ids, dtype=dtype)

    @property
    def changed(self) -> list[int]:
        """Prompts whose answer the fine-tune changed decisively: where the fine-tuned and base answers part, the
        fine-tuned model prefers its own token over the base's by at least DECISIVE logits. A near-tie there (a
        random tiny model's answers are all near-ties) is a coin the quantization may flip, not a lesson learnt."""
        out = []
        for i, (tuned, base, steps) in enumerate(zip(self.tuned, self.base, self.tuned_steps)):
            split = next((k for k, (a, b) in enumerate(zip(tuned, base)) if a != b), None)
            if split is None:
                continue
            if steps[split][tuned[split]] - steps[split][base[split]] >= DECISIVE:
                out.append(i)
        return out


def _answer_nll(logits_of, prompt: Prompt) -> float:
    ids = prompt.ids + prompt.answer
    return nll(logits_of(ids), ids, start=len(prompt.ids))


def _similarity(a: list[int], b: list[int]) -> float:
    return difflib.SequenceMatcher(a=a, b=b, autojunk=False).ratio()


def _is_tie(logits: np.ndarray, choice: int) -> bool:
    return bool(logits[choice] >= logits.max() - TIE)


def compare(reference: Reference, route: Route) -> Check:
    """Every figure of one route against the reference; `failures` says in words why it does not pass."""
    n_ctx = max([len(c) for c in reference.text] + [len(p.ids) + max(len(p.answer), NEW_TOKENS)
                                                    for p in reference.prompts]) + 8
    model = GGUFModel(route, n_ctx, reference.stop_ids)
    agree = ties = positions = 0
    kld = nll_merged = nll_gguf = max_diff = 0.0
    for chunk, ref_logp in zip(reference.text, reference.text_logp):
        logits = model.logits(chunk)
        vocab = min(ref_logp.shape[1], logits.shape[1])
        ref = torch.from_numpy(ref_logp[:, :vocab])  # float64, as log_softmax gives; torch for speed
        got = torch.from_numpy(log_softmax(logits[:, :vocab]))
        same = ref.argmax(1) == got.argmax(1)
        agree += int(same.sum())
        ties += sum(_is_tie(ref[i].numpy(), int(got[i].argmax())) for i in torch.nonzero(~same).flatten().tolist())
        positions += len(chunk)
        kld += float((ref.exp() * (ref - got)).sum())
        max_diff = max(max_diff, float(((ref - ref.amax(1, keepdim=True)) - (got - got.amax(1, keepdim=True)))
                                       .abs().max()))
        targets, following = torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])
        nll_merged -= float(ref[targets, following].sum())
        nll_gguf -= float(got[targets, following].sum())
    answers = [model.greedy(p.ids) for p in reference.prompts]
    greedy_equal = greedy_ties = 0
    for want, steps, got in zip(reference.tuned, reference.tuned_steps, answers):
        split = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if split is None and len(want) == len(got):
            greedy_equal += 1
        elif split is not None and _is_tie(steps[split], got[split]):
            greedy_ties += 1
    changed = reference.changed
    kept = sum(_similarity(answers[i], reference.tuned[i]) > _similarity(answers[i], reference.base[i])
               for i in changed)
    scored = [p for p in reference.prompts if p.answer]
    retained = None
    if scored:
        route_nll = [_answer_nll(model.logits, p) for p in scored]
        gain = sum(reference.answer_nll_base) - sum(reference.answer_nll_tuned)
        retained = (sum(reference.answer_nll_base) - sum(route_nll)) / gain if gain > 0 else None
    predicted = sum(len(c) - 1 for c in reference.text)
    check = Check(file=route.file, route=route.label, quant=route.quant, positions=positions,
                  top1_agreement=agree / positions, top1_ties=ties, kld_mean=kld / positions,
                  ppl_merged=math.exp(nll_merged / predicted), ppl_gguf=math.exp(nll_gguf / predicted),
                  prompts=len(reference.prompts), changed=len(changed), kept=kept, retained=retained,
                  greedy_equal=greedy_equal, greedy_ties=greedy_ties, max_abs_logit_diff=max_diff, failures=[])
    check.failures.extend(_failures(check, exact=route.quant in EXACT_TYPES and route.adapter is None))
    return check


def _failures(c: Check, *, exact: bool) -> list[str]:
    """Why a route fails, one phrase per broken threshold (THRESHOLDS states them)."""
    out = []
    if c.lost_finetune:
        out.append(f"lost the fine-tune: answers like the base model on {c.changed - c.kept} of the {c.changed} "
                   f"prompts the fine-tune changed")
    if exact:
        if c.top1_agreement * c.positions + c.top1_ties < c.positions:
            out.append(f"conversion changed the model: top-1 differs beyond ties at "
                       f"{c.positions - round(c.top1_agreement * c.positions) - c.top1_ties} positions")
        if c.greedy_equal + c.greedy_ties < c.prompts:
            out.append(f"conversion changed the model: {c.prompts - c.greedy_equal - c.greedy_ties} greedy answers "
                       f"differ")
        return out
    if c.ppl_ratio > PPL_RATIO_MAX:
        out.append(f"perplexity {c.ppl_ratio:.2f}× the merged model's (> {PPL_RATIO_MAX})")
    if c.kld_mean > KLD_MAX:
        out.append(f"mean KL divergence {c.kld_mean:.3f} (> {KLD_MAX})")
    if c.top1_agreement + c.top1_ties / c.positions < TOP1_MIN:
        out.append(f"top-1 agreement {c.top1_agreement:.1%} (+{c.top1_ties} ties; < {TOP1_MIN:.0%})")
    return out


COLUMNS = (
    ("route", "what Ollama would load: one GGUF file, or a base GGUF with a LoRA GGUF applied (`ADAPTER`)."),
    ("type", "the route's weight type: f16, bf16 and f32 are conversions and must agree exactly; the others "
             "approximate and pass within the thresholds below."),
    ("kept", "prompts (from the training data) whose greedy answer the fine-tune changed decisively, and how many "
             "of them this file answers closer to the fine-tuned model than to the base model."),
    ("retained", "the share of the fine-tune's log-likelihood gain on the trained answers this file keeps "
                 "(100% = all of it, 0% = none: it scores the answers like the base model)."),
    ("perplexity (merged → file)", "the merged model's and this file's, on general text nobody trained on; the "
                                   "ratio is what the export costs in plain language modelling."),
    ("KL divergence", "how far this file's next-token distribution is from the merged model's, averaged over "
                      "every position of that text (0 = identical)."),
    ("top-1", "positions where this file's most likely next token is the merged model's (+ ties: the merged "
              f"model's two best logits within {TIE}, where either choice is right)."),
    ("greedy equal", f"prompts on which this file's greedy answer (up to {NEW_TOKENS} tokens) is the merged "
                     "model's, token for token (+ ties: where the answers part, the merged model's two best logits "
                     f"were within {TIE}). 16-bit files must match on every prompt; a quantized file may word an "
                     "answer differently and still keep the fine-tune (kept)."),
    ("result", "pass, or each threshold the route broke; a route that lost the fine-tune has its fix under the "
               "table."),
)
"""verify.md's table columns, each with the sentence that explains it under the table."""


def report(checks: list[Check], out_dir: Path, reference: Reference) -> Path:
    """verify.md (for people) and verify.json (for tools: one entry per GGUF route) next to the GGUF files."""
    rows = [f"| {c.route} | {c.quant} | {c.kept}/{c.changed} | "
            f"{'n/a' if c.retained is None else f'{c.retained:.0%}'} | {c.ppl_merged:.2f} → {c.ppl_gguf:.2f} "
            f"({c.ppl_ratio:.3f}×) | {c.kld_mean:.4f} | {c.top1_agreement:.1%} (+{c.top1_ties} ties) | "
            f"{c.greedy_equal}/{c.prompts} (+{c.greedy_ties} ties) | "
            f"{'PASS' if c.passed else 'FAIL: ' + '; '.join(c.failures)} |" for c in checks]
    fixes = [f"- **{c.route}**: {c.fix}." for c in checks if c.fix]
    dtype = str(reference.dtype).removeprefix("torch.")
    text = "\n".join([
        f"# GGUF verification against the fine-tuned model (merged, transformers, {dtype})",
        "",
        f"{len(reference.prompts)} trained prompts ({len(reference.changed)} whose greedy answer the fine-tune "
        f"changed decisively from the base model's); {sum(len(c) for c in reference.text)} tokens of general text.",
        "",
        f"| {' | '.join(header for header, _ in COLUMNS)} |",
        f"|{'---|' * len(COLUMNS)}",
        *rows, "",
        *(["To keep the fine-tune where a route lost it:", *fixes, ""] if fixes else []),
        "What each figure means:", *(f"- **{header}**: {meaning}" for header, meaning in COLUMNS), "",
        f"A route passes when: {THRESHOLDS}.", ""])
    atomic.write_json(out_dir / "verify.json",
                      [{**asdict(c), "ppl_ratio": c.ppl_ratio, "lost_finetune": c.lost_finetune, "fix": c.fix,
                        "passed": c.passed} for c in checks])
    return atomic.write_text(out_dir / "verify.md", text)
