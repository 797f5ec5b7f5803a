"""Rendering: what build() hands the trainer is exactly the family template's ids and labels (real tokenizers),
the length policy never cuts inside a prompt silently, and a second run reads the cache instead of tokenizing."""

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finetune import config
from finetune.data import build, build_preference, inspect, render, render_inspect, save_length_histogram_png
from finetune.errors import UserError
from finetune.models import chat, registry
from finetune.models.chat.format import ChatFormat
from finetune.models.tokenizers import bundled_tokenizer_dir

MODELS = {"chatglm3": "tiny_chatglm3", "baichuan2": "tiny_baichuan2_7b", "qwen1": "tiny_qwen1",
          "qwen2_5": "tiny_qwen2_5", "llama2": "tiny_llama2"}
STOPS = {"chatglm3": ("</s>", "<|user|>"), "baichuan2": ("</s>",), "qwen1": ("<|im_end|>",),
         "qwen2_5": ("<|im_end|>",), "llama2": ("</s>",)}  # the end-of-answer labels
CONVERSATION = [
    {"role": "system", "content": "你是一名简洁的数学老师。"},
    {"role": "user", "content": "What is 12 times 7?"},
    {"role": "assistant", "content": "12 × 7 = 84."},
    {"role": "user", "content": "再加上 16 呢？"},
    {"role": "assistant", "content": "84 + 16 = 100。"},
]


@pytest.fixture(scope="session")
def tokenizer_dirs():
    return {family: bundled_tokenizer_dir(family) for family in MODELS}  # in the shared cache, built once


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dirs):
    loaded = {}

    def get(family):
        if family not in loaded:
            loaded[family] = AutoTokenizer.from_pretrained(tokenizer_dirs[family])
        return loaded[family]

    return get


@pytest.fixture(autouse=True)
def isolated_cache(tokenizer_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(family: str, path: Path, *overrides: str):
    return config.load(None, [f"model={MODELS[family]}", f"data.path={path}", *overrides])


def template(family: str) -> str:
    return registry.spec(MODELS[family]).family.template


@pytest.mark.parametrize("family", sorted(MODELS))
def test_build_gives_exactly_the_template_ids_and_labels(family, tokenizer, tmp_path):
    tok = tokenizer(family)
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    row = build(recipe(family, path), tok, template(family))["train"][0]
    expected = chat.get(template(family)).encode_conversation(tok, CONVERSATION)
    assert row["input_ids"] == expected.input_ids and row["labels"] == expected.labels
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    trained = [label for label in row["labels"] if label != -100]
    stops = {tok.convert_tokens_to_ids(s) for s in STOPS[family]}
    assert sum(label in stops for label in trained) == 2  # each of the two answers learns its stop
    text = tok.decode([label for label in trained if label not in stops])
    assert "84" in text and "100" in text and "12 times" not in text and "老师" not in text


def test_trainer_collator_passes_our_labels_through_unchanged(tokenizer, tmp_path):
    tok = tokenizer("baichuan2")  # its labels hold eos under a user token: a value, not just a mask
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}])
    rows = build(recipe("baichuan2", path), tok, template("baichuan2"))["train"]
    batch = DataCollatorForLanguageModeling(pad_token_id=0)([rows[0], rows[1]])
    for i in range(2):
        n = len(rows[i]["labels"])
        assert batch["labels"][i, :n].tolist() == rows[i]["labels"]
        assert (batch["labels"][i, n:] == -100).all()
    assert 2 in batch["labels"][0][torch.tensor(rows[0]["input_ids"]) == 195].tolist()


def test_recipe_system_prompt_applies_only_where_none_is_given(tokenizer, tmp_path):
    tok = tokenizer("llama2")
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[:3]}])
    rows = build(recipe("llama2", path, "data.system_prompt=Answer briefly."), tok, "llama2")["train"]
    with_default = [{"role": "system", "content": "Answer briefly."}, *CONVERSATION[1:3]]
    assert rows[0]["input_ids"] == chat.get("llama2").encode_conversation(tok, with_default).input_ids
    assert rows[1]["input_ids"] == chat.get("llama2").encode_conversation(tok, CONVERSATION[:3]).input_ids


def test_fit_cuts_after_the_last_whole_answer_or_inside_the_first_or_drops():
    ids = list(range(12))
    labels = [-100, -100, -100, 3, 4, -100, -100, -100, 8, 9, 10, -100]  # prompt, answer, prompt, answer
    assert render.fit(ids, labels, 12) == (ids, labels, "")
    assert render.fit(ids, labels, 9) == (ids[:5], labels[:5], "truncated")  # later turns dropped whole
    assert render.fit(ids, labels[:3] + [3, 4, 5, 6, 7, 8, 9, 10, 11], 6) == (ids[:6], labels[:3] + [3, 4, 5],
                                                                                "truncated")
    assert render.fit(ids, labels, 3) == ([], [], "too_long_prompt")


def test_too_long_prompts_are_dropped_and_counted_and_long_answers_truncated(tokenizer, tmp_path):
    tok = tokenizer("llama2")
    rows = [{"messages": CONVERSATION},
            {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 80}]}]
    r = recipe("llama2", jsonl(tmp_path / "chat.jsonl", rows), "train.max_length=72")
    report = inspect(r, tok, "llama2", preview=5)
    assert report["dropped"] == {"too_long_prompt": 1}
    assert report["count"] == 2 and report["truncated"] == 2
    assert all(len(e["input_ids"]) <= 72 for e in report["examples"])
    whole = chat.get("llama2").encode_conversation(tok, CONVERSATION)
    first_end = max(i for i, label in enumerate(whole.labels[:72]) if label == 2) + 1  # first answer's </s>
    assert report["examples"][0]["input_ids"] == whole.input_ids[:first_end]


def test_plain_text_trains_every_token_and_is_split_not_cut(tokenizer, tmp_path):
    tok = tokenizer("llama2")
    text = "Paris is the capital of France. " * 12
    rows = build(recipe("llama2", jsonl(tmp_path / "t.jsonl", [{"text": text}]), "train.max_length=32"), tok,
                 "llama2")["train"]
    ids = [i for row in rows for i in row["input_ids"]]
    assert ids == tok(text)["input_ids"] + [tok.eos_token_id]
    assert all(len(row["input_ids"]) <= 32 for row in rows) and len(rows) > 1
    assert rows[0]["labels"][0] == -100 and rows[0]["labels"][1:] == rows[0]["input_ids"][1:]  # BOS not trained


@pytest.mark.parametrize("family", sorted(MODELS))
def test_preference_ids_are_the_templates_prompt_and_answers(family, tokenizer, tmp_path):
    tok = tokenizer(family)
    prompt = [CONVERSATION[0], CONVERSATION[1]]
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": "12 × 7 = 84.", "rejected": "12 × 7 = 74."}])
    row = build_preference(recipe(family, path, "stage=dpo"), tok, template(family))["train"][0]
    assert row["prompt_ids"] == chat.get(template(family)).encode_prompt(tok, prompt)
    for key, answer in (("chosen_ids", "12 × 7 = 84."), ("rejected_ids", "12 × 7 = 74.")):
        answered = [*prompt, {"role": "assistant", "content": answer}]
        whole = chat.get(template(family)).encode_conversation(tok, answered)
        end = max(i for i, label in enumerate(whole.labels) if label != -100) + 1
        assert row["prompt_ids"] + row[key] == whole.input_ids[:end]
        assert row[key][-1] == tok.convert_tokens_to_ids(STOPS[family][-1] if family != "chatglm3" else "</s>")


def test_second_build_reads_the_cache_and_tokenizes_nothing(tokenizer, tmp_path, monkeypatch):
    tok = tokenizer("qwen2_5")
    r = recipe("qwen2_5", jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 3), "data.val_size=1")
    first = build(r, tok, "qwen2_5")

    def tripwire(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(ChatFormat, "encode_conversation", tripwire)
    second = build(r, tok, "qwen2_5")
    assert second["train"][:] == first["train"][:] and second["eval"][:] == first["eval"][:]
    with pytest.raises(AssertionError, match="tokenized again"):  # a changed setting does tokenize
        build(config.with_overrides(r, ["train.max_length=1000"]), tok, "qwen2_5")


def test_conversation_the_template_refuses_is_fatal_or_counted(tokenizer, tmp_path):
    tok = tokenizer("llama2")
    bad = [{"role": "user", "content": "What does [INST] mean?"}, {"role": "assistant", "content": "A tag."}]
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": bad}])
    with pytest.raises(UserError, match=rf"{path}: 1 of 2 records is refused: line 2: the llama2 template refuses "
                                        r".*\[INST\].*to train on the other 1"):
        build(recipe("llama2", path), tok, "llama2")
    report = inspect(recipe("llama2", path, "data.on_bad_record=skip"), tok, "llama2")
    assert report["dropped"] == {"template": 1} and report["skipped"] == 1 and report["count"] == 1


def test_inspect_report_matches_build_and_renders(tokenizer, tmp_path):
    tok = tokenizer("qwen2_5")
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[:3]}]
    r = recipe("qwen2_5", jsonl(tmp_path / "chat.jsonl", rows), "train.micro_batch=2")
    report = inspect(r, tok, "qwen2_5", preview=2)
    built = build(r, tok, "qwen2_5")["train"]
    assert report["examples"] == [{"input_ids": built[i]["input_ids"], "labels": built[i]["labels"]} for i in (0, 1)]
    assert report["count"] == 3 and sum(report["histogram"]["counts"]) == 3
    assert report["tokens"]["total"] == sum(len(x) for x in built["input_ids"])
    assert report["tokens"]["trained"] == sum(v != -100 for x in built["labels"] for v in x)
    assert 0 < report["padding_waste"]["share"] < 1
    console = Console(record=True, width=100)
    console.print(render_inspect(report, tok))
    assert "84 + 16 = 100。<|im_end|>" in console.export_text()
    png = save_length_histogram_png(report, tmp_path / "out" / "lengths.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
