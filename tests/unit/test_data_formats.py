"""Every input format becomes the same internal conversation; every kind of bad input is one clear message naming
the file, the line and the field (or, with data.on_bad_record=skip, a count by reason)."""

import hashlib
import json
from pathlib import Path

import pytest

from finetune import config
from finetune.data import formats, load
from finetune.errors import UserError



def m(role: str, content: str, tool_calls: list | None = None) -> dict:
    """An internal message: every key present, as the Arrow schema declares them."""
    return {"role": role, "content": content, "tool_calls": tool_calls}


PAIR = [m("user", "What is 2 plus 3?"), m("assistant", "2 + 3 = 5.")]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def splits(path: Path, *overrides: str):
    recipe = config.load(None, ["model=tiny_qwen2_5", f"data.path={path}", *overrides])
    return load.load_splits(recipe)


def test_alpaca_joins_instruction_and_input_and_keeps_system_and_history():
    record = {"instruction": "Translate into Chinese.", "input": "Thank you.", "output": "谢谢。",
              "system": "You translate.", "history": [["Hi", "Hello!"]]}
    assert formats.to_messages(record, "alpaca", {}) == [
        m("system", "You translate."), m("user", "Hi"), m("assistant", "Hello!"),
        m("user", "Translate into Chinese.\nThank you."), m("assistant", "谢谢。")]


def test_sharegpt_from_value_turns_and_system_column_become_messages():
    record = {"conversations": [{"from": "human", "value": "What is 2 plus 3?"},
                                {"from": "gpt", "value": "2 + 3 = 5."}],
              "system": "Be brief."}
    assert formats.to_messages(record, "sharegpt", {}) == [m("system", "Be brief."), *PAIR]


def test_an_empty_system_turn_means_no_system_prompt():
    record = {"messages": [{"role": "system", "content": ""}, *PAIR]}
    assert formats.to_messages(record, "messages", {}) == PAIR


def test_openai_messages_pass_through_with_their_system_prompt():
    record = {"messages": [{"role": "system", "content": "Be brief."}, *PAIR]}
    assert formats.to_messages(record, "messages", {}) == [m("system", "Be brief."), *PAIR]


def test_plain_text_is_one_text_message():
    assert formats.to_messages({"text": "Paris is the capital of France."}, "text", {}) == [
        m("text", "Paris is the capital of France.")]


def test_preference_accepts_plain_and_conversational_answers():
    plain = formats.to_preference({"prompt": "2+3?", "chosen": "5", "rejected": "6", "system": "Be brief."}, {})
    assert plain == {"prompt": [m("system", "Be brief."), m("user", "2+3?")], "chosen": "5", "rejected": "6",
                     "tools": None}
    chat = formats.to_preference({"prompt": [{"role": "user", "content": "2+3?"}],
                                  "chosen": [{"role": "assistant", "content": "5"}],
                                  "rejected": [{"role": "assistant", "content": "6"}]}, {})
    assert chat == {"prompt": [m("user", "2+3?")], "chosen": "5", "rejected": "6", "tools": None}


def test_column_mapping_reads_fields_from_other_columns():
    record = {"question": "What is 2 plus 3?", "answer": "2 + 3 = 5."}
    columns = {"instruction": "question", "output": "answer"}
    assert formats.detect(record, columns, "x") == "alpaca"
    assert formats.to_messages(record, "alpaca", columns) == PAIR


def test_detect_names_the_columns_it_saw_when_no_format_fits():
    with pytest.raises(UserError, match=r"x\.jsonl.*\['answer', 'query'\].*data\.format"):
        formats.detect(["query", "answer"], {}, "x.jsonl")


@pytest.mark.parametrize("path", ["alpaca_zh_en.json", "sharegpt_multiturn.jsonl", "messages_system.jsonl",
                                  "preference_zh_en.jsonl", "text_facts.jsonl"])
def test_shipped_samples_load_without_a_single_bad_record(path):
    repo = Path(__file__).resolve().parents[2]
    train, dropped, preference = splits(repo / "data" / path)
    assert dropped == {} and len(train["train"]) >= 28
    assert preference == path.startswith("preference")


def test_each_format_loads_from_a_file_into_the_same_schema(tmp_path):
    files = {
        "alpaca": jsonl(tmp_path / "a.jsonl", [{"instruction": "What is 2 plus 3?", "output": "2 + 3 = 5."}]),
        "sharegpt": jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "What is 2 plus 3?"},
                                                                    {"from": "gpt", "value": "2 + 3 = 5."}]}]),
        "messages": jsonl(tmp_path / "m.jsonl", [{"messages": PAIR}]),
    }
    for fmt, path in files.items():
        for given in ("auto", fmt):
            ds = splits(path, f"data.format={given}")[0]["train"]
            assert ds[0]["messages"] == PAIR, (fmt, given)


BAD = {  # case: (records, line of the bad one, reason, words the message must contain)
    "malformed_json": (['{"instruction": "a", "output": "b"}', '{"instruction": "c" "output": "d"}'], 2,
                       "malformed_json", "not valid JSON"),
    "missing_field": ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], 2, "missing_field",
                      "'output' is missing"),
    "empty_answer": ([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "  "}], 2,
                     "empty_answer", "'output'"),
    "wrong_role_order": ([{"messages": PAIR}, {"messages": [PAIR[1], PAIR[0]]}], 2, "bad_role_order",
                         "messages[0]: role 'assistant'"),
    "ends_with_user": ([{"messages": PAIR}, {"messages": PAIR + [PAIR[0]]}], 2, "bad_role_order",
                       "ends with a user turn"),
    "unknown_role": ([{"messages": PAIR}, {"messages": [{"role": "robot", "content": "x"}, *PAIR]}], 2,
                     "unknown_role", "role 'robot'"),
    "not_text": ([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 5}], 2, "bad_type",
                 "'output'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_is_fatal_with_file_line_and_field(tmp_path, case):
    records, line, _, words = BAD[case]
    path = jsonl(tmp_path / "train.jsonl", ["", *records[:1], "", *records[1:]])  # blank lines count as lines
    with pytest.raises(UserError) as err:
        splits(path)
    message = str(err.value)
    assert f"{path} line {line + 2}" in message and words in message
    assert "data.on_bad_record=skip" in message


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_is_skipped_and_counted_and_the_file_is_untouched(tmp_path, case):
    records, _, reason, _ = BAD[case]
    path = jsonl(tmp_path / "train.jsonl", [*records, *records[:1]])
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    data, dropped, _ = splits(path, "data.on_bad_record=skip")
    assert dropped == {reason: 1}
    assert len(data["train"]) == 2
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_missing_file_is_named():
    with pytest.raises(UserError, match=r"data\.path: file data/nope\.jsonl does not exist"):
        splits(Path("data/nope.jsonl"))


def test_unknown_format_of_a_source_suggests_the_right_one(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(UserError, match=r"data\.mix\[0\]: unknown data format 'alpca' \(did you mean: alpaca\?\)"):
        load.load_source(str(path), "alpca", {}, on_bad_record="error", max_samples=None, num_proc=None,
                         where="data.mix[0]")


def test_file_whose_columns_fit_no_format_is_an_error_naming_it(tmp_path):
    path = jsonl(tmp_path / "odd.jsonl", [{"query": "a", "answer": "b"}])
    with pytest.raises(UserError, match=r"odd\.jsonl.*data\.columns"):
        splits(path)


def test_broken_json_array_names_its_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "output": }\n]\n')
    with pytest.raises(UserError, match=rf"{path} line 3: not valid JSON"):
        splits(path)
