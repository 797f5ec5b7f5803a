"""BLEU-4 and ROUGE-1/2/L of generated answers, scored the way the Chinese anchors score them.

LLaMA-Factory (`scripts/eval_bleu_rouge.py`, `ComputeSimilarity`) and ChatGLM's ptuning `main.py` do, per pair:
- ROUGE: both texts segmented with jieba, joined by spaces, scored by rouge-chinese (`Rouge().get_scores`), the F
  measure; a side with no token scores 0. jieba keeps Latin words whole, so English is scored by words.
- BLEU-4: nltk `sentence_bleu` with `SmoothingFunction().method3`, over the CHARACTERS of the texts
  (`list(label)`), not jieba words.
and report the mean over pairs × 100. We do exactly that for every pair whose reference holds a CJK character, so a
Chinese figure here is the figure those tools print. For a reference without CJK (English), characters would make
BLEU-4 a spelling score, so BLEU-4 is over word tokens: jieba's segmentation without the whitespace (words and
punctuation marks), the usual word-level BLEU.
"""

from __future__ import annotations

import logging
import re
from statistics import fmean
from typing import Any

from finetune.errors import UserError

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
INSTALL = "pip install 'finetune[eval]'"


def require() -> None:
    """Fail early (before minutes of loading) when the metric libraries are missing."""
    try:
        import jieba  # noqa: F401
        import nltk  # noqa: F401
        import rouge_chinese  # noqa: F401
    except ImportError as exc:
        raise UserError(f"BLEU/ROUGE need jieba, rouge-chinese and nltk ({exc.name} is not installed): "
                        f"{INSTALL}") from None


def _jieba() -> Any:
    require()
    import jieba

    jieba.setLogLevel(logging.CRITICAL)  # its "Building prefix dict" lines are noise on stderr
    return jieba


def segment(text: str) -> list[str]:
    """jieba's tokens, whitespace dropped: what ROUGE compares (the anchors' `" ".join(jieba.cut(t)).split()`)."""
    return " ".join(_jieba().cut(text)).split()


def bleu_tokens(text: str, chinese: bool) -> list[str]:
    """Characters for a Chinese pair (as the anchors: whitespace included), word tokens otherwise."""
    return list(text) if chinese else segment(text)


def is_chinese(text: str) -> bool:
    return bool(CJK.search(text))


def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 in [0, 100] (nltk, smoothing method3)."""
    require()
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    chinese = is_chinese(reference)
    hyp, ref = bleu_tokens(prediction, chinese), bleu_tokens(reference, chinese)
    if not hyp or not ref:
        return 0.0
    return 100 * float(sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3))


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F in [0, 100] over jieba tokens (rouge-chinese); 0 when a side has no token."""
    hyp, ref = segment(prediction), segment(reference)
    if not hyp or not ref:
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    from rouge_chinese import Rouge

    scores = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    return {name: 100 * float(scores[name]["f"]) for name in ("rouge-1", "rouge-2", "rouge-l")}


def score(prediction: str, reference: str) -> dict[str, float]:
    """Every metric of one pair, rounded as the anchors round (4 decimals)."""
    return {k: round(v, 4) for k, v in {"bleu-4": bleu4(prediction, reference), **rouge(prediction, reference)}.items()}


def mean(rows: list[dict[str, float]]) -> dict[str, float]:
    """The corpus figure: the mean of the per-pair scores (what LLaMA-Factory's predict_* report)."""
    return {k: round(fmean(r[k] for r in rows), 4) if rows else 0.0 for k in METRICS}
