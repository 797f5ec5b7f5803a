"""Multiple-choice benchmarks: each published layout read (files of the same shape written here, never the real
ones), the prompt LLaMA-Factory builds, and scoring that picks the letter with the highest logit."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.errors import UserError
from finetune.evaluate import choice
from finetune.evaluate.options import EvalSettings
from finetune.infer.generate import Engine

ZH = [("中国的首都是哪里？", "上海", "北京", "广州", "深圳", "B"), ("1+1等于几？", "1", "3", "2", "4", "C"),
      ("水的化学式是？", "H2O", "CO2", "O2", "NaCl", "A")]
EN = [("What is 2+2?", "3", "4", "5", "6", "B"), ("The capital of France?", "Rome", "Berlin", "Madrid", "Paris", "D")]


def _csv(path: Path, rows: list, header: list | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def write_ceval(root: Path, subject: str = "computer_network") -> Path:
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    for split in ("val", "dev"):
        rows = [[i, *q, "因为……"] for i, q in enumerate(ZH * (2 if split == "dev" else 1))]
        _csv(root / split / f"{subject}_{split}.csv", rows, header)
    return root


def write_cmmlu(root: Path, subject: str = "agronomy") -> Path:
    for split in ("test", "dev"):
        rows = [[i, *q] for i, q in enumerate(ZH * (2 if split == "dev" else 1))]
        _csv(root / split / f"{subject}.csv", rows, ["", "Question", "A", "B", "C", "D", "Answer"])
    return root


def write_mmlu(root: Path, subject: str = "high_school_physics") -> Path:
    for split in ("test", "dev"):
        _csv(root / "data" / split / f"{subject}_{split}.csv", EN * (3 if split == "dev" else 1))
    return root


WRITERS = {"ceval": (write_ceval, ZH), "cmmlu": (write_cmmlu, ZH), "mmlu": (write_mmlu, EN)}


@pytest.mark.parametrize("task", list(WRITERS))
def test_each_published_layout_is_read(tmp_path, task):
    write, expected = WRITERS[task]
    bench = choice.read(EvalSettings(dir=str(write(tmp_path)), task=task, shots=5))
    (subject, questions), = bench.questions.items()
    assert [(q.question, *q.choices, q.answer) for q in questions] == [tuple(q) for q in expected]
    assert len(bench.examples[subject]) == 5 and bench.split == {"ceval": "val"}.get(task, "test")


def test_wrong_layout_names_the_file_and_the_column(tmp_path):
    _csv(tmp_path / "val" / "law_val.csv", [[0, "q", "a", "b", "c", "d", "A"]],
                ["id", "question", "A", "B", "C", "D", "label"])
    with pytest.raises(UserError, match=r"law_val\.csv: no column 'answer'.*id,question,A,B,C,D,answer"):
        choice.read(EvalSettings(dir=str(tmp_path), task="ceval"))
    _csv(tmp_path / "mmlu" / "test" / "x_test.csv", [["question", "A", "B", "C", "D", "answer"]])
    with pytest.raises(UserError, match="x_test.csv: starts with a header row"):
        choice.read(EvalSettings(dir=str(tmp_path / "mmlu"), task="mmlu"))
    _csv(tmp_path / "bad" / "test" / "y_test.csv", [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(UserError, match=r"y_test.csv line 1: answer 'E'"):
        choice.read(EvalSettings(dir=str(tmp_path / "bad"), task="mmlu"))


def test_missing_folders_and_dev_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        choice.read(EvalSettings(dir=str(tmp_path / "nope"), task="cmmlu"))
    with pytest.raises(UserError, match=r"no test/ folder.*test/<subject>\.csv"):
        choice.read(EvalSettings(dir=str(tmp_path), task="cmmlu"))
    write_cmmlu(tmp_path)
    (tmp_path / "dev" / "agronomy.csv").unlink()
    with pytest.raises(UserError, match=r"eval.shots=5 takes its examples from .*dev/agronomy.csv"):
        choice.read(EvalSettings(dir=str(tmp_path), task="cmmlu", shots=5))


def test_prompt_is_llama_factory_eval_template():
    q, shot = choice.Question(*EN[0][:1], EN[0][1:5], EN[0][5]), choice.Question(EN[1][0], EN[1][1:5], EN[1][5])
    turns = choice.messages(q, [shot], "high school physics", "en")
    assert turns == [
        {"role": "user", "content": "The following are multiple choice questions (with answers) about high school "
                                    "physics.\n\nThe capital of France?\nA. Rome\nB. Berlin\nC. Madrid\nD. Paris"
                                    "\nAnswer:"},
        {"role": "assistant", "content": "D"},
        {"role": "user", "content": "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"}]
    zh = choice.messages(choice.Question(*ZH[0][:1], ZH[0][1:5], ZH[0][5]), [], "计算机网络", "zh")
    assert zh[0]["content"].startswith("以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n中国的首都")
    assert zh[0]["content"].endswith("\nD. 深圳\n答案：")


class _Backend:
    context_length = 4096


@pytest.mark.parametrize("family", ["qwen2_5", "chatglm3", "llama2"])
def test_answer_position_is_where_the_trained_answer_starts(family):
    """The letters LLaMA-Factory compares (encode(letter)[-1]); ChatGLM3's answer begins with '▁' + newline, which
    are put after the prompt so the letter is scored where the model writes it."""
    from finetune.models import tiny

    tokenizer = tiny._tokenizer(family)
    prefix, letters = choice.answer_position(Engine(_Backend(), tokenizer, family, ["m"]))
    assert letters == [tokenizer.encode(c, add_special_tokens=False)[-1] for c in "ABCD"]
    assert tokenizer.convert_ids_to_tokens(prefix) == (["▁", "<0x0A>"] if family == "chatglm3" else [])


class _Logits(torch.nn.Module):
    """A model whose favourite next token after a prompt of length n is letter n % 4 (every other position
    favours letter 0): the right position must be read in a right-padded batch."""

    def __init__(self, letters: list[int], vocab: int = 64):
        super().__init__()
        self.letters, self.vocab = letters, vocab

    def forward(self, input_ids, attention_mask, logits_to_keep):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, self.vocab)
        logits[:, :, self.letters[0]] = 1.0
        lengths = attention_mask.sum(-1)
        for row in range(b):
            last = int(lengths[row]) - 1
            logits[row, last, self.letters[0]] = 0.0
            logits[row, last, self.letters[int(lengths[row]) % 4]] = 5.0
        return SimpleNamespace(logits=logits[:, logits_to_keep])


def test_scoring_picks_the_letter_with_the_highest_logit_at_each_answer_position():
    letters = [10, 11, 12, 13]
    engine = SimpleNamespace(backend=SimpleNamespace(model=_Logits(letters), device="cpu"),
                             tokenizer=SimpleNamespace(pad_token_id=0))
    prompts = [[1] * n for n in (5, 2, 7, 4, 3, 6, 9)]
    progress = lambda **_: SimpleNamespace(update=lambda n: None, close=lambda: None)  # noqa: E731
    assert choice.score(engine, prompts, letters, 3, progress) == ["ABCD"[n % 4] for n in (5, 2, 7, 4, 3, 6, 9)]


def test_a_real_tiny_model_scores_batched_as_one_prompt_at_a_time(tmp_path):
    from finetune.infer import backends, load
    from finetune.infer.options import LoadOptions

    options = LoadOptions(model="tiny_qwen2_5")
    engine = backends.load(load.resolve(options), options)
    bench = choice.read(EvalSettings(dir=str(write_ceval(tmp_path)), task="ceval", shots=5))
    progress = lambda *a, **k: SimpleNamespace(update=lambda n: None, close=lambda: None)  # noqa: E731
    results = choice.evaluate(engine, bench, batch_size=2, progress=progress)
    prefix, letters = choice.answer_position(engine)
    model = engine.backend.model
    for answer, q in zip(results["answers"], bench.questions["computer_network"]):
        ids = engine.prompt_ids(choice.messages(q, bench.examples["computer_network"], "computer network", "zh"))
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids + prefix])).logits[0, -1, letters]
        assert answer["predicted"] == "ABCD"[int(logits.argmax())]
    overall = results["overall"]
    assert overall["total"] == 3 and overall["accuracy"] == round(100 * overall["correct"] / 3, 2)
    assert results["subjects"]["computer_network"]["total"] == 3
