"""Multiple-choice benchmarks (C-Eval, CMMLU, MMLU) from their published files, scored as LLaMA-Factory scores them.

Layouts, as the benchmarks publish them (`eval.dir` is the unpacked folder; a `data/` level is looked into too):
    ceval   dev/{subject}_dev.csv, val/{subject}_val.csv     header id,question,A,B,C,D,answer[,explanation]
    cmmlu   dev/{subject}.csv, test/{subject}.csv            header ,Question,A,B,C,D,Answer
    mmlu    dev/{subject}_dev.csv, test|val/{subject}_*.csv  no header: question,A,B,C,D,answer
Subject names in the instruction come from a `mapping.json` beside them when there is one (LLaMA-Factory's
{subject: {name, category}}, or C-Eval's `subject_mapping.json` {subject: [en, zh, category]}), else from the
file name; a category mapping also gives per-category accuracy.

The prompt is LLaMA-Factory's eval template in the model's own chat format: the instruction ("以下是中国关于{subject}
考试的单项选择题…" / "The following are multiple choice questions (with answers) about {subject}.") opens the first
user turn; each shot is a user turn (question, "\\nA. …" per choice, "\\n答案：" / "\\nAnswer:") answered by its
letter; the question is the last user turn. The score is the logits of the letters A-D at the position where the
answer begins, the highest wins. "Where the answer begins" is taken from the training encoding of a one-letter
answer, so a format whose answer starts with a fixed token (ChatGLM3's newline) is scored at the letter itself.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from finetune.errors import UserError, did_you_mean

LETTERS = ("A", "B", "C", "D")
PROMPTS = {
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n答案："),
    "en": ("The following are multiple choice questions (with answers) about {subject}.\n\n", "\nAnswer:"),
}
LAYOUTS: dict[str, dict[str, Any]] = {
    # file name per split, the header expected (None: no header), the columns read, the prompt language
    "ceval": {"file": "{subject}_{split}.csv", "header": ("id", "question", "A", "B", "C", "D", "answer"),
              "columns": ("question", "A", "B", "C", "D", "answer"), "lang": "zh"},
    "cmmlu": {"file": "{subject}.csv", "header": ("", "Question", "A", "B", "C", "D", "Answer"),
              "columns": ("Question", "A", "B", "C", "D", "Answer"), "lang": "zh"},
    "mmlu": {"file": "{subject}_{split}.csv", "header": None, "columns": (0, 1, 2, 3, 4, 5), "lang": "en"},
}


@dataclass
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # A-D


def _where(root: Path, split: str) -> Optional[Path]:
    return next((d for d in (root / split, root / "data" / split) if d.is_dir()), None)


def read_file(path: Path, task: str) -> list[Question]:
    """One subject's CSV in the task's layout; a wrong layout is an error naming the file and what was expected."""
    layout = LAYOUTS[task]
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    header, expected = None, layout["header"]
    if expected is not None:
        if not rows:
            raise UserError(f"{path}: empty; a {task} file starts with the header {','.join(expected)}")
        header, rows = rows[0], rows[1:]
        missing = [c for c in expected if c and c not in header]
        if missing:
            raise UserError(f"{path}: no column {', '.join(repr(c) for c in missing)}; the {task} layout's header is "
                            f"{','.join(expected)} (found {','.join(header)})")
        index = [header.index(c) for c in layout["columns"]]
    else:
        if rows and [c.strip().lower() for c in rows[0][:6]] == ["question", "a", "b", "c", "d", "answer"]:
            raise UserError(f"{path}: starts with a header row; mmlu files have none (question,A,B,C,D,answer)")
        index = list(layout["columns"])
    found = []
    for line, row in enumerate(rows, 2 if header else 1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(index):
            raise UserError(f"{path} line {line}: {len(row)} columns; the {task} layout needs question, A, B, C, D "
                            f"and answer")
        question, a, b, c, d, answer = (row[i] for i in index)
        answer = answer.strip().upper()
        if answer not in LETTERS:
            raise UserError(f"{path} line {line}: answer '{answer}' is not one of A, B, C, D")
        found.append(Question(question, (a, b, c, d), answer))
    return found


def subjects(root: Path, task: str, split: str, only: Optional[str]) -> dict[str, Path]:
    """{subject: file} of `split` under the benchmark directory `root`."""
    if not root.is_dir():
        raise UserError(f"eval.dir={root} does not exist; unpack the {task} files there")
    folder = _where(root, split)
    if folder is None:
        raise UserError(f"eval.dir={root}: no {split}/ folder; the {task} layout is "
                        f"{split}/{LAYOUTS[task]['file'].format(subject='<subject>', split=split)}")
    suffix = LAYOUTS[task]["file"].format(subject="", split=split)
    found = {p.name[: len(p.name) - len(suffix)]: p for p in sorted(folder.glob(f"*{suffix}"))}
    if not found:
        raise UserError(f"{folder}: no *{suffix} file; the {task} layout is "
                        f"{split}/{LAYOUTS[task]['file'].format(subject='<subject>', split=split)}")
    if only:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in found]
        if unknown:
            raise UserError(f"eval.subjects: no subject '{unknown[0]}' in {folder}{did_you_mean(unknown[0], found)}")
        found = {s: found[s] for s in wanted}
    return found


def shots_for(root: Path, task: str, subject: str, shots: int) -> list[Question]:
    if not shots:
        return []
    folder = _where(root, "dev")
    path = (folder or root / "dev") / LAYOUTS[task]["file"].format(subject=subject, split="dev")
    if not path.is_file():
        raise UserError(f"eval.shots={shots} takes its examples from {path}, which does not exist")
    found = read_file(path, task)
    if len(found) < shots:
        raise UserError(f"{path}: {len(found)} dev question(s), eval.shots={shots} needs {shots}")
    return found[:shots]


def mapping(root: Path) -> dict[str, dict[str, str]]:
    """{subject: {name, category}} from mapping.json (LLaMA-Factory) or subject_mapping.json (C-Eval), if any."""
    for name in ("mapping.json", "subject_mapping.json"):
        path = next((p for p in (root / name, root / "data" / name) if p.is_file()), None)
        if path is None:
            continue
        raw = json.loads(path.read_text(encoding="utf-8"))
        out = {}
        for subject, value in raw.items():
            if isinstance(value, dict):
                out[subject] = {"name": value.get("name", subject), "category": value.get("category")}
            elif isinstance(value, list) and len(value) >= 3:
                out[subject] = {"name": value[1], "category": value[2]}  # C-Eval: [English, 中文, category]
        return out
    return {}


def _turn(q: Question, answer_prompt: str) -> str:
    return q.question + "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices)) + answer_prompt


def messages(q: Question, shots: list[Question], subject_name: str, lang: str) -> list[dict[str, str]]:
    """The conversation LLaMA-Factory's EvalTemplate.format_example builds, without the last answer."""
    instruction, answer_prompt = PROMPTS[lang]
    turns: list[dict[str, str]] = []
    for shot in shots:
        turns += [{"role": "user", "content": _turn(shot, answer_prompt)},
                  {"role": "assistant", "content": shot.answer}]
    turns.append({"role": "user", "content": _turn(q, answer_prompt)})
    turns[0] = {"role": "user", "content": instruction.format(subject=subject_name) + turns[0]["content"]}
    return turns


def answer_position(engine: Any) -> tuple[list[int], list[int]]:
    """(ids that follow the prompt before the answer itself, the first id of each letter's answer), read from the
    training encoding of one-letter answers."""
    from finetune.data.render import with_system

    probe = [{"role": "user", "content": "?"}]
    prompt = engine.prompt_ids(probe)
    tails = []
    for letter in LETTERS:
        conversation = with_system(probe + [{"role": "assistant", "content": letter}], engine.system)
        ids = engine.chat.encode_conversation(engine.tokenizer, conversation).input_ids
        if ids[: len(prompt)] != prompt:
            raise RuntimeError(f"{engine.template}: the answer encoding does not extend the inference prompt")
        tails.append(ids[len(prompt):])
    common = 0
    while all(len(t) > common + 1 and t[common] == tails[0][common] for t in tails):
        common += 1
    letters = [t[common] for t in tails]
    if len(set(letters)) != len(LETTERS):
        raise RuntimeError(f"{engine.template}: the letters A-D do not begin with distinct tokens")
    return tails[0][:common], letters


def model_of(engine: Any) -> Any:
    """The torch model behind the engine: scoring needs logits, which only the transformers backend gives."""
    model = getattr(engine.backend, "model", None)
    if model is None or not hasattr(model, "forward"):
        raise UserError("benchmarks are scored from the model's logits: use backend=transformers (the default)")
    return model


def score(engine: Any, prompts: list[list[int]], letters: list[int], batch_size: int, progress: Any
          ) -> list[str]:
    """The letter with the highest logit after each prompt; batches of similar length, right-padded."""
    import torch

    model, device = model_of(engine), engine.backend.device
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    picked: dict[int, str] = {}
    bar = progress(total=len(prompts), desc="scoring", unit="question")
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, : len(prompts[i])] = torch.tensor(prompts[i])
                mask[row, : len(prompts[i])] = 1
            last = torch.tensor([len(prompts[i]) - 1 for i in batch])
            keep = torch.unique(last)  # only the answer positions' logits: never batch × length × vocabulary
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           logits_to_keep=keep.to(device)).logits
            column = torch.searchsorted(keep, last)
            chosen = logits[torch.arange(len(batch)), column.to(logits.device)][:, letters].argmax(-1)
            for row, i in enumerate(batch):
                picked[i] = LETTERS[int(chosen[row])]
            bar.update(len(batch))
    bar.close()
    return [picked[i] for i in range(len(prompts))]



@dataclass
class Benchmark:
    task: str
    root: Path
    split: str
    shots: int
    lang: str
    questions: dict[str, list[Question]]  # subject -> questions
    examples: dict[str, list[Question]]  # subject -> its shots
    names: dict[str, dict[str, str]]  # subject -> {name, category}


def read(settings: Any) -> Benchmark:
    """Every file the benchmark run needs, read and checked before any model is loaded."""
    from finetune.evaluate.options import SPLITS

    task, root = settings.task, Path(settings.dir).expanduser()
    split = settings.split or SPLITS[task]
    files = subjects(root, task, split, settings.subjects)
    questions = {s: read_file(p, task)[: settings.limit] for s, p in files.items()}
    if not any(questions.values()):
        raise UserError(f"eval.dir={root}: the {split} files hold no questions")
    examples = {s: shots_for(root, task, s, settings.shots) for s in files}
    return Benchmark(task, root, split, settings.shots, LAYOUTS[task]["lang"], questions, examples, mapping(root))


def evaluate(engine: Any, bench: Benchmark, batch_size: int, progress: Any) -> dict[str, Any]:
    """Per-subject, per-category and overall accuracy."""
    prompt_tail, letters = answer_position(engine)
    jobs: list[tuple[str, Question, list[int]]] = []
    for subject, questions in bench.questions.items():
        name = bench.names.get(subject, {}).get("name") or subject.replace("_", " ")
        for q in questions:
            ids = engine.prompt_ids(messages(q, bench.examples[subject], name, bench.lang)) + prompt_tail
            jobs.append((subject, q, ids))
    answers = score(engine, [ids for _, _, ids in jobs], letters, batch_size, progress)
    per: dict[str, dict[str, Any]] = {}
    for (subject, q, _), answer in zip(jobs, answers):
        category = bench.names.get(subject, {}).get("category")
        row = per.setdefault(subject, {"correct": 0, "total": 0, "category": category})
        row["total"] += 1
        row["correct"] += answer == q.answer
    categories: dict[str, dict[str, Any]] = {}
    for row in per.values():
        row["accuracy"] = round(100 * row["correct"] / row["total"], 2)
        if row["category"]:
            cat = categories.setdefault(row["category"], {"correct": 0, "total": 0})
            cat["correct"] += row["correct"]
            cat["total"] += row["total"]
    for cat in categories.values():
        cat["accuracy"] = round(100 * cat["correct"] / cat["total"], 2)
    correct, total = sum(r["correct"] for r in per.values()), sum(r["total"] for r in per.values())
    return {"task": bench.task, "dir": str(bench.root), "split": bench.split, "shots": bench.shots,
            "scoring": "logits of the letters A-D at the answer position", "subjects": per,
            "categories": categories, "overall": {"correct": correct, "total": total,
                                                  "accuracy": round(100 * correct / total, 2)},
            "answers": [{"subject": s, "answer": q.answer, "predicted": a} for (s, q, _), a in zip(jobs, answers)]}
