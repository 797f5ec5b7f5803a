"""BLEU-4 / ROUGE as the Chinese anchors compute them: hand-computed figures and the reference libraries' own."""

from __future__ import annotations

import math

import jieba
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from finetune.evaluate import metrics


def test_segmentation_is_jieba_words_without_whitespace():
    assert metrics.segment("Hello world, 你好世界。") == ["Hello", "world", ",", "你好", "世界", "。"]
    assert metrics.segment("  \n ") == []


def test_chinese_bleu4_is_over_characters_by_hand():
    # characters: 今天天气很好 vs 今天天气不错 → n-gram precisions 4/6, 3/5, 2/4, 1/3, same length (BP = 1)
    expected = 100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.bleu4("今天天气很好", "今天天气不错") == pytest.approx(expected, rel=1e-9)


def test_english_bleu4_is_over_words_by_hand():
    # words + punctuation: 7 tokens each; precisions 6/7, 4/6, 2/5, 1/4 (only one "the" is clipped in)
    expected = 100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert metrics.bleu4("The cat sat on the mat.", "The cat sat on a mat.") == pytest.approx(expected, rel=1e-9)


def test_chinese_rouge_by_hand():
    # jieba: [今天天气, 很, 好] vs [今天天气, 不错]: one shared word, P = 1/3, R = 1/2, F = 0.4; no shared bigram
    scores = metrics.rouge("今天天气很好", "今天天气不错")
    assert scores["rouge-1"] == pytest.approx(40.0, abs=1e-4)
    assert scores["rouge-2"] == 0.0
    assert scores["rouge-l"] == pytest.approx(40.0, abs=1e-4)


@pytest.mark.parametrize("prediction, reference", [
    ("我叫小调，是一个由你训练的助手。", "我是小调，一个乐于助人的助手。"),
    ("长城全长约两万一千公里。", "长城的总长度大约是21196公里。"),
])
def test_chinese_pairs_match_the_anchor_code_exactly(prediction, reference):
    """What LLaMA-Factory's eval_bleu_rouge.py / ChatGLM ptuning compute for the same pair."""
    hyp, ref = list(jieba.cut(prediction)), list(jieba.cut(reference))
    rouge = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    got = metrics.score(prediction, reference)
    assert got["bleu-4"] == round(bleu * 100, 4)
    for name in ("rouge-1", "rouge-2", "rouge-l"):
        assert got[name] == round(rouge[name]["f"] * 100, 4)


def test_identical_answers_score_100_and_empty_ones_0():
    same = metrics.score("My name is Xiaodiao.", "My name is Xiaodiao.")
    assert all(math.isclose(v, 100.0, abs_tol=1e-3) for v in same.values())
    assert metrics.score("", "我叫小调。") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert metrics.score("完全不同", "Something else") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0,
                                                        "rouge-l": 0.0}


def test_corpus_figure_is_the_mean_of_pairs():
    rows = [metrics.score("今天天气很好", "今天天气不错"), metrics.score("你好", "你好")]
    assert metrics.mean(rows)["rouge-1"] == pytest.approx((40.0 + 100.0) / 2, abs=1e-3)
    assert metrics.mean([]) == {m: 0.0 for m in metrics.METRICS}


def test_missing_libraries_name_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_jieba(name, *args, **kwargs):
        if name == "jieba":
            raise ImportError("No module named 'jieba'", name="jieba")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jieba)
    with pytest.raises(metrics.UserError, match=r"pip install 'finetune\[eval\]'"):
        metrics.require()
