"""A LLaMA-Factory data folder works unchanged: `data.name=NAME data.dir=DIR` reads DIR/dataset_info.json (file,
formatting, columns, tags, ranking, num_samples), and `finetune data data.dir=DIR` lists its entries. The folders
here are written by the tests in LLaMA-Factory's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune import config
from finetune.data import load
from finetune.errors import UserError

INFO = {
    "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"},
    "mapped": {"file_name": "mapped.jsonl", "columns": {"prompt": "q", "query": "ctx", "response": "a",
                                                        "system": "sys", "history": "hist"}},
    "glaive_toolcall_zh_demo": {"file_name": "glaive.json", "formatting": "sharegpt",
                                "columns": {"messages": "conversations", "tools": "tools"}},
    "tagged": {"file_name": "tagged.jsonl", "formatting": "sharegpt",
               "columns": {"messages": "dialog", "system": "sys_prompt", "tools": "functions"},
               "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "client", "assistant_tag": "agent",
                        "observation_tag": "result", "function_tag": "call", "system_tag": "setup"}},
    "dpo_zh_demo": {"file_name": "dpo.json", "ranking": True, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "alpaca_dpo": {"file_name": "alpaca_dpo.jsonl", "ranking": True,
                   "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "kto_en_demo": {"file_name": "kto.json", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "label"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant"}},
    "five": {"file_name": "alpaca_zh_demo.json", "num_samples": 5},
    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en"},
    "ms_only": {"ms_hub_url": "AI-ModelScope/x"},
    "mllm_demo": {"file_name": "mllm.json", "formatting": "sharegpt", "columns": {"messages": "messages",
                                                                                 "images": "images"}},
}
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def m(role: str, content: str, tool_calls: list | None = None) -> dict:
    return {"role": role, "content": content, "tool_calls": tool_calls}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path) -> Path:
    """A LLaMA-Factory-style data/ folder: dataset_info.json and the files it names."""
    root = tmp_path / "LLaMA-Factory" / "data"
    root.mkdir(parents=True)

    def write(name: str, rows: list, array: bool = True) -> None:
        text = json.dumps(rows, ensure_ascii=False, indent=2) if array else \
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (root / name).write_text(text, encoding="utf-8")

    (root / "dataset_info.json").write_text(json.dumps(INFO, indent=2), encoding="utf-8")
    write("alpaca_zh_demo.json", [{"instruction": f"{i}+1=?", "input": "", "output": str(i + 1)} for i in range(3)])
    write("mapped.jsonl", [{"q": "翻译", "ctx": "谢谢", "a": "Thank you", "sys": "You translate.",
                            "hist": [["Hi", "Hello!"]]}], array=False)
    write("glaive.json", [{"conversations": [
        {"from": "human", "value": "北京天气？"},
        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}"},
        {"from": "observation", "value": "22"}, {"from": "gpt", "value": "22 度。"}],
        "tools": json.dumps([WEATHER])}])
    write("tagged.jsonl", [{"sys_prompt": "Be brief.", "functions": json.dumps([WEATHER]), "dialog": [
        {"speaker": "client", "text": "Weather?"},
        {"speaker": "call", "text": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}"},
        {"speaker": "result", "text": "-3"}, {"speaker": "agent", "text": "-3 °C."}]}], array=False)
    write("dpo.json", [{"conversations": [{"from": "human", "value": "2+3?"}],
                        "chosen": {"from": "gpt", "value": "5"}, "rejected": {"from": "gpt", "value": "6"}}])
    write("alpaca_dpo.jsonl", [{"instruction": "Add", "input": "2+3", "chosen": "5", "rejected": "6"}], array=False)
    write("kto.json", [{"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}],
                        "label": True}])
    return root


def splits(*overrides: str):
    return load.load_splits(config.load(None, ["model=tiny_qwen2_5", *overrides]))


def test_an_alpaca_entry_loads_by_name(folder):
    data, dropped, kind = splits("data.name=alpaca_zh_demo", f"data.dir={folder}")
    assert [row[1]["content"] for row in data["train"]["messages"]] == ["1", "2", "3"]
    assert dropped == {} and kind == "conversations"


def test_llama_factory_column_names_map_to_the_alpaca_fields(folder):
    data, _, _ = splits("data.name=mapped", f"data.dir={folder}")
    assert data["train"][0]["messages"] == [m("system", "You translate."), m("user", "Hi"), m("assistant", "Hello!"),
                                           m("user", "翻译\n谢谢"), m("assistant", "Thank you")]


def test_sharegpt_tags_name_the_keys_and_roles_of_the_turns(folder):
    data, _, _ = splits("data.name=tagged", f"data.dir={folder}")
    row = data["train"][0]
    assert row["messages"] == [
        m("system", "Be brief."), m("user", "Weather?"),
        m("assistant", "", [{"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}]),
        m("tool", "-3"), m("assistant", "-3 °C.")]
    assert json.loads(row["tools"]) == [WEATHER]


def test_several_names_load_together_and_replace_the_recipes_data_path(folder):
    data, _, _ = splits("data.path=${sample:alpaca_zh_en.json}", "data.name=alpaca_zh_demo, glaive_toolcall_zh_demo",
                        f"data.dir={folder}")
    assert len(data["train"]) == 3 + 1
    assert data["train"][3]["messages"][1]["tool_calls"][0]["name"] == "get_weather"


@pytest.mark.parametrize("name", ["dpo_zh_demo", "alpaca_dpo"])
def test_ranking_entries_are_preference_data(folder, name):
    data, _, preference = splits(f"data.name={name}", f"data.dir={folder}")
    row = data["train"][0]
    assert preference and (row["chosen"], row["rejected"]) == ("5", "6")
    assert row["prompt"][-1]["content"] in ("2+3?", "Add\n2+3")


def test_num_samples_takes_exactly_that_many_examples_repeating_a_small_file(folder):
    data, _, _ = splits("data.name=five", f"data.dir={folder}")
    answers = [row[1]["content"] for row in data["train"]["messages"]]
    assert len(answers) == 5 and set(answers) == {"1", "2", "3"}


@pytest.mark.parametrize("name,words", [
    ("kto_en_demo", "KTO records"),
    ("ms_only", "neither file_name nor hf_hub_url"),
    ("mllm_demo", "has images; the models trained here read text only"),
    ("alpaca_zh", r"data\.name=alpaca_zh: no such dataset in .*dataset_info\.json \(did you mean: alpaca_zh_demo"),
])
def test_entries_that_cannot_be_read_are_one_clear_error(folder, name, words):
    with pytest.raises(UserError, match=words):
        splits(f"data.name={name}", f"data.dir={folder}")


def test_a_name_needs_a_registry_folder_that_has_dataset_info(tmp_path):
    with pytest.raises(UserError, match="data.name=x needs data.dir=DIR"):
        splits("data.name=x")
    with pytest.raises(UserError, match=rf"data\.dir={tmp_path}: no dataset_info\.json there"):
        splits("data.name=x", f"data.dir={tmp_path}")


def test_finetune_data_lists_a_registry(folder, cli):
    out = cli("data", f"data.dir={folder}", "--json")
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    rows = {row["name"]: row for row in listing["datasets"]}
    assert list(rows) == list(INFO)
    assert rows["dpo_zh_demo"]["format"] == "sharegpt_preference" and rows["kto_en_demo"]["format"] == "kto"
    assert rows["alpaca_zh_demo"]["found"] is True and rows["mllm_demo"]["found"] is False
    assert rows["alpaca_en"]["found"] is None  # a hub dataset
    table = cli("data", f"data.dir={folder}")
    assert table.returncode == 0 and "glaive_toolcall_zh_demo" in table.stdout and "data.name=NAME" in table.stdout


def test_finetune_data_on_a_folder_without_a_registry_exits_2(tmp_path, cli):
    out = cli("data", f"data.dir={tmp_path}")
    assert out.returncode == 2 and "no dataset_info.json there" in out.stderr and out.stdout == ""
