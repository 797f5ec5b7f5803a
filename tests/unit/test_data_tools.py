"""The data people already have: tool-calling conversations (LLaMA-Factory's sharegpt roles and OpenAI's), content
part lists, preference records in the sharegpt/messages/alpaca layouts and KTO records are read from files into
the internal schema, and reach the trainer as exactly the family template's ids and labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_tools_templates import official_qwen2_5

from finetune import config
from finetune.data import build, build_preference, formats, load, render
from finetune.errors import UserError
from finetune.models import chat
from finetune.models.tokenizers import bundled_tokenizer

M = -100
MODELS = {"qwen2_5": "tiny_qwen2_5", "chatglm3": "tiny_chatglm3", "qwen1": "tiny_qwen1", "llama2": "tiny_llama2"}
WEATHER = {"name": "get_weather", "description": "天气", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SHAREGPT_TOOLS = {  # LLaMA-Factory's glaive_toolcall layout: function_call / observation turns, tools as JSON text
    "conversations": [
        {"from": "human", "value": "北京天气？"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "北京"}},
                                                      ensure_ascii=False)},
        {"from": "observation", "value": "{\"temp\": 22}"},
        {"from": "gpt", "value": "北京 22 度。"}],
    "tools": json.dumps([WEATHER], ensure_ascii=False)}
OPENAI_TOOLS = {  # the same conversation as OpenAI's fine-tuning files write it
    "messages": [
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 22}"},
        {"role": "assistant", "content": "北京 22 度。"}],
    "tools": [{"type": "function", "function": WEATHER}]}
INTERNAL = [
    {"role": "user", "content": "北京天气？", "tool_calls": None},
    {"role": "assistant", "content": "",
     "tool_calls": [{"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}]},
    {"role": "tool", "content": "{\"temp\": 22}", "tool_calls": None},
    {"role": "assistant", "content": "北京 22 度。", "tool_calls": None}]
HF_CONVERSATION = [  # the same conversation as transformers' chat templates take it
    {"role": "user", "content": "北京天气？"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京"}}]},
    {"role": "tool", "content": "{\"temp\": 22}"},
    {"role": "assistant", "content": "北京 22 度。"}]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(path: Path, *overrides: str, family: str = "qwen2_5"):
    return config.load(None, [f"model={MODELS[family]}", f"data.path={path}", *overrides])


def test_sharegpt_function_call_and_openai_tool_calls_become_the_same_conversation():
    for record, fmt in ((SHAREGPT_TOOLS, "sharegpt"), (OPENAI_TOOLS, "messages")):
        assert formats.to_messages(record, fmt, {}) == INTERNAL, fmt
    tools = [formats.convert_batch({k: [v] for k, v in r.items()}, [0], fmt=f, columns={}, roles={}, src="x")["tools"]
             for r, f in ((SHAREGPT_TOOLS, "sharegpt"), (OPENAI_TOOLS, "messages"))]
    assert [json.loads(t[0]) for t in tools] == [[WEATHER], [{"type": "function", "function": WEATHER}]]


def test_tool_files_load_with_declared_features_and_tools_kept_exactly(tmp_path):
    other = {"name": "now", "parameters": {"properties": {}, "type": "object"}}  # another key order and shape
    second = {**OPENAI_TOOLS, "tools": [{"type": "function", "function": other}]}
    train = load.load_splits(recipe(jsonl(tmp_path / "t.jsonl", [OPENAI_TOOLS, second])))[0]["train"]
    assert train.features == formats.SFT_FEATURES
    assert train[0]["messages"] == INTERNAL
    assert [json.loads(t) for t in train["tools"]] == [OPENAI_TOOLS["tools"], second["tools"]]


@pytest.mark.parametrize("family", ["qwen2_5", "chatglm3", "qwen1"])
def test_tool_data_reaches_the_trainer_as_the_family_tool_format(tmp_path, family):
    tok = bundled_tokenizer(family)
    (tmp_path / "tools").mkdir()  # one file per layout, read as one directory
    jsonl(tmp_path / "tools" / "glaive.jsonl", [SHAREGPT_TOOLS])
    jsonl(tmp_path / "tools" / "openai.jsonl", [OPENAI_TOOLS])
    rows = build(recipe(tmp_path / "tools", family=family), tok, family)["train"]
    assert len(rows) == 2
    expected = chat.get(family).encode_conversation(tok, HF_CONVERSATION, tools=[WEATHER])
    for row in rows:
        assert row["input_ids"] == expected.input_ids and row["labels"] == expected.labels
    if family == "qwen2_5":
        assert rows[0]["input_ids"] == official_qwen2_5(HF_CONVERSATION, [WEATHER])
    trained = tok.decode([label for label in rows[0]["labels"] if label != M])
    assert "get_weather" in trained and "22 度" in trained and "temp" not in trained  # the result is not trained


def test_a_family_without_a_tool_format_names_the_record_and_the_reason(tmp_path):
    path = jsonl(tmp_path / "tools.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                               {"from": "gpt", "value": "Hello"}]}, SHAREGPT_TOOLS])
    with pytest.raises(UserError, match=rf"{path}: 1 of 2 records is refused: line 2: the llama2 template refuses "
                                        "this conversation: Llama-2-chat has no official tool-call format"):
        build(recipe(path, family="llama2"), bundled_tokenizer("llama2"), "llama2")
    rendered, dropped, _ = render.prepare(recipe(path, "data.on_bad_record=skip", family="llama2"),
                                          bundled_tokenizer("llama2"), "llama2")
    assert dropped == {"template": 1} and len(rendered["train"]) == 1
    assert rendered["train"].features == render.RENDERED_FEATURES


def test_content_parts_are_joined_text_in_both_part_styles():
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+3?"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "5"}]}]}
    assert [m["content"] for m in formats.to_messages(record, "messages", {})] == ["What is 2+3?", "5"]


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}}])
def test_a_non_text_part_is_a_clear_bad_record_naming_the_line(tmp_path, part):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    bad = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]},
                        {"role": "assistant", "content": "A cat."}]}
    path = jsonl(tmp_path / "mm.jsonl", [good, bad])
    with pytest.raises(UserError, match=rf"{path}: 1 of 2 records is malformed: line 2: messages\[0\]\.content\[1\] "
                                        rf"is a '{part['type']}' part: images/audio are not supported"):
        load.load_splits(recipe(path))
    data, dropped, _ = load.load_splits(recipe(path, "data.on_bad_record=skip"))
    assert dropped == {"not_text": 1} and len(data["train"]) == 1


PREFERENCE_LAYOUTS = {
    "sharegpt_preference": {"conversations": [{"from": "human", "value": "2+3?"}],
                            "chosen": {"from": "gpt", "value": "5"}, "rejected": {"from": "gpt", "value": "6"}},
    "messages_preference": {"messages": [{"role": "user", "content": "2+3?"}],
                            "chosen": {"role": "assistant", "content": "5"},
                            "rejected": [{"role": "assistant", "content": "6"}]},
    "alpaca_preference": {"instruction": "2+3?", "input": "", "chosen": "5", "rejected": "6"},
    "preference": {"prompt": "2+3?", "chosen": "5", "rejected": "6"},
}


@pytest.mark.parametrize("layout", sorted(PREFERENCE_LAYOUTS))
def test_every_preference_layout_is_detected_and_loads_the_same_rows(tmp_path, layout):
    path = jsonl(tmp_path / "dpo.jsonl", [PREFERENCE_LAYOUTS[layout]])
    assert formats.detect(PREFERENCE_LAYOUTS[layout], {}, "x") == layout
    data, dropped, kind = load.load_splits(recipe(path))
    assert kind == "paired" and dropped == {}
    row = data["train"][0]
    assert (row["prompt"], row["chosen"], row["rejected"], row["tools"]) == (
        [{"role": "user", "content": "2+3?", "tool_calls": None}], "5", "6", None)


def test_sharegpt_preference_with_tools_gives_the_prompt_and_completions_of_the_tool_format(tmp_path):
    record = {"conversations": SHAREGPT_TOOLS["conversations"][:3], "tools": SHAREGPT_TOOLS["tools"],
              "chosen": {"from": "gpt", "value": "北京 22 度。"},
              "rejected": {"from": "gpt", "value": "不知道。"}}
    tok = bundled_tokenizer("qwen2_5")
    row = build_preference(recipe(jsonl(tmp_path / "dpo.jsonl", [record])), tok, "qwen2_5")["train"][0]
    assert row["prompt_ids"] == official_qwen2_5(HF_CONVERSATION[:3], [WEATHER], add_generation_prompt=True)
    assert row["prompt_ids"] + row["chosen_ids"] == official_qwen2_5(HF_CONVERSATION, [WEATHER])[:-1]  # no "\n"


@pytest.mark.parametrize("layout", sorted(PREFERENCE_LAYOUTS))
def test_each_preference_layout_can_be_named(tmp_path, layout):
    path = jsonl(tmp_path / "dpo.jsonl", [PREFERENCE_LAYOUTS[layout]])
    rows, _, fmt = load.load_source(str(path), layout, {}, on_bad_record="error", max_samples=None, num_proc=None,
                                    where="data.path")
    assert fmt == layout and rows[0]["chosen"] == "5"
    with pytest.raises(UserError, match=r"data\.path: these are KTO records"):
        load.load_source(str(path), "kto", {}, on_bad_record="error", max_samples=None, num_proc=None,
                         where="data.path")


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}], "label": True},
    {"conversations": [{"from": "human", "value": "2+3?"}, {"from": "gpt", "value": "6"}], "label": False},
    {"prompt": "2+3?", "completion": "5", "label": True}])
def test_kto_records_are_detected_and_train_with_stage_kto_only(tmp_path, record):
    path = jsonl(tmp_path / "kto.jsonl", [record])
    with pytest.raises(UserError, match=r"KTO records .*they train with stage=kto, not stage=sft"):
        load.load_splits(recipe(path))
    data, _, kind = load.load_splits(recipe(path, "stage=kto", "train.micro_batch=2"))
    row = data["train"][0]
    assert kind == "unpaired" and row["label"] == record["label"] and row["completion"] in ("5", "6")
    assert (row["prompt"][-1]["role"], row["prompt"][-1]["content"]) == ("user", "2+3?")


def test_kto_conversations_train_as_sft_only_when_named_so(tmp_path):
    record = {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}],
              "label": True}
    data, _, kind = load.load_splits(recipe(jsonl(tmp_path / "kto.jsonl", [record]), "data.format=messages"))
    assert kind == "conversations" and data["train"][0]["messages"][1]["content"] == "5"


@pytest.mark.parametrize("record,reason,words", [
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{not json"}]},
     "bad_tool_call", "conversations[1]: the tool call is not valid JSON"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "observation", "value": "r"}]},
     "bad_role_order", "conversations[1]: role 'tool' after 'user'"),
    ({"conversations": [{"from": "human", "value": "a"},
                        {"from": "function_call", "value": "{\"name\": \"f\", \"arguments\": {}}"},
                        {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]},
     "bad_role_order", "conversations[2]: role 'user' after a tool call"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "tools": "{oops"},
     "bad_tools", "'tools' is not valid JSON"),
])
def test_bad_tool_records_are_marked_with_a_reason_naming_the_field(record, reason, words):
    out = formats.convert_batch({k: [v] for k, v in record.items()}, [0], fmt="sharegpt", columns={}, roles={},
                                src="x")
    assert out["_drop"] == [reason] and words in out["_why"][0]
