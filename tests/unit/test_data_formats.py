"""Every input format becomes the same internal conversation; every kind of bad input is one clear message naming
the file, the line and the field, counting every bad record of the file (or, with data.on_bad_record=skip, a count
by reason and a warning)."""

import hashlib
import json
import logging
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
    train, dropped, kind = splits(repo / "data" / path)
    assert dropped == {} and len(train["train"]) >= 28
    assert kind == ("paired" if path.startswith("preference") else "conversations")


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
    assert message.startswith(f"{path}: 1 of 2 records is malformed: line {line + 2}: ") and words in message
    assert message.endswith("fix it, or set data.on_bad_record=skip to train on the other 1")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_is_skipped_and_counted_and_the_file_is_untouched(tmp_path, case, caplog):
    records, _, reason, words = BAD[case]
    path = jsonl(tmp_path / "train.jsonl", [*records, *records[:1]])
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        data, dropped, _ = splits(path, "data.on_bad_record=skip")
    assert dropped == {reason: 1}
    assert len(data["train"]) == 2
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    [warning] = [r.getMessage() for r in caplog.records if r.name.startswith("finetune.data")]
    assert warning.startswith(f"{path}: 1 of 3 records is malformed: line 2: ") and words in warning
    assert warning.endswith("; left out (data.on_bad_record=skip)")


def numbered(n: int) -> list[dict]:
    return [{"instruction": f"What is {i} plus 1?", "output": f"{i + 1}."} for i in range(n)]


def test_every_bad_record_of_a_file_is_counted_and_the_first_few_named(tmp_path):
    """LLaMA-Factory's demo files hold a few malformed records among hundreds (it skips them with a warning): the
    error says how many and where before the user chooses to skip them."""
    records = numbered(300)
    del records[16]["output"], records[203]["output"]
    path = tmp_path / "x.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError) as err:
        splits(path)
    assert str(err.value) == (f"{path}: 2 of 300 records are malformed (records 17, 204): record 17: 'output' is "
                              "missing; fix them, or set data.on_bad_record=skip to train on the other 298")
    data, dropped, _ = splits(path, "data.on_bad_record=skip")
    assert dropped == {"missing_field": 2} and len(data["train"]) == 298


def test_unreadable_lines_and_bad_records_are_counted_together_by_their_lines(tmp_path):
    good = [json.dumps(r) for r in numbered(4)]
    path = jsonl(tmp_path / "x.jsonl", [good[0], '{"instruction": "a" "output": "b"}', "", good[1],
                                        '{"instruction": "c"}', good[2], "[1, 2]", good[3]])
    with pytest.raises(UserError) as err:
        splits(path)
    assert str(err.value).startswith(f"{path}: 3 of 7 records are malformed (lines 2, 5, 7): line 2: not valid JSON")
    assert str(err.value).endswith("to train on the other 4")
    data, dropped, _ = splits(path, "data.on_bad_record=skip")
    assert dropped == {"malformed_json": 2, "missing_field": 1}
    assert [m[0]["content"] for m in data["train"]["messages"]] == [f"What is {i} plus 1?" for i in range(4)]
    assert data["train"]["_row"] == [0, 2, 4, 6]  # rows keep their number in the user's file


def test_past_a_few_bad_records_the_rest_are_counted(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [*([{"instruction": "a"}] * 8), *numbered(2)])
    with pytest.raises(UserError, match=r": 8 of 10 records are malformed \(lines 1, 2, 3, 4, 5 and 3 more\): line 1: "):
        splits(path)


def test_a_file_whose_every_record_is_unreadable_says_so(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", ["{oops", "", "[]"])
    with pytest.raises(UserError, match=r"x\.jsonl: 2 of 2 records are malformed \(lines 1, 3\): line 1: not valid "
                                        r"JSON .*; no record of it can be read"):
        splits(path, "data.on_bad_record=skip")


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
