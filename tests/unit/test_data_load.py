"""Loading through `datasets`: file types, directories and globs, weighted mixing, held-out splits, max_samples."""

import csv
import json
from pathlib import Path

import pytest
from datasets import Dataset

from finetune import config
from finetune.data import files, load
from finetune.errors import UserError


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


def alpaca_rows(n: int, tag: str = "") -> list[dict]:
    return [{"instruction": f"What is {i} plus 1?{tag}", "input": "", "output": f"{i} + 1 = {i + 1}."}
            for i in range(n)]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def splits(*overrides: str):
    return load.load_splits(config.load(None, ["model=tiny_qwen2_5", *overrides]))


def questions(ds) -> list[str]:
    return [m[0]["content"] for m in ds["messages"]]


def test_csv_parquet_and_json_array_load_like_jsonl(tmp_path):
    rows = alpaca_rows(3)
    rows[1]["output"] = "42"  # a number-looking answer in CSV stays text
    with (tmp_path / "a.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    expected = splits(f"data.path={jsonl(tmp_path / 'a.jsonl', rows)}")[0]["train"]["messages"]
    for name in ("a.csv", "a.parquet", "a.json"):
        assert splits(f"data.path={tmp_path / name}")[0]["train"]["messages"] == expected, name


def test_directory_and_glob_read_every_data_file_in_order(tmp_path):
    jsonl(tmp_path / "d" / "1.jsonl", alpaca_rows(2, " (1)"))
    jsonl(tmp_path / "d" / "sub" / "2.jsonl", alpaca_rows(3, " (2)"))
    (tmp_path / "d" / "notes.txt").write_text("not data")
    from_dir = splits(f"data.path={tmp_path / 'd'}")[0]["train"]
    from_glob = splits(f"data.path={tmp_path / 'd'}/**/*.jsonl")[0]["train"]
    assert len(from_dir) == 5 and questions(from_dir) == questions(from_glob)
    assert set(from_dir["_src"]) == {str(tmp_path / "d" / "1.jsonl"), str(tmp_path / "d" / "sub" / "2.jsonl")}


def test_hub_ids_are_recognised_but_paths_never_are(tmp_path):
    assert files.resolve("tatsu-lab/alpaca", "data.path") is None
    with pytest.raises(UserError, match="does not exist"):
        files.resolve("data/missing.jsonl", "data.path")
    with pytest.raises(UserError, match="no .* file matches"):
        files.resolve(f"{tmp_path}/*.jsonl", "data.path")


def test_mix_weights_subsample_and_repeat_deterministically(tmp_path):
    main = jsonl(tmp_path / "main.jsonl", alpaca_rows(10, " main"))
    extra = jsonl(tmp_path / "extra.jsonl", alpaca_rows(10, " extra"))
    mix = f"data.mix=[{{path: {extra}, weight: 0.5}}, {{path: {main}, weight: 2.5}}]"
    train = splits(f"data.path={main}", mix)[0]["train"]
    sources = [Path(s).stem for s in train["_src"]]
    assert sources.count("main") == 10 + 25 and sources.count("extra") == 5
    extra_rows = [q for q, s in zip(questions(train), sources) if s == "extra"]
    assert len(set(extra_rows)) == 5  # a half without repeats
    assert questions(splits(f"data.path={main}", mix)[0]["train"]) == questions(train)  # seeded


def test_mix_rejects_a_non_positive_weight(tmp_path):
    main = jsonl(tmp_path / "main.jsonl", alpaca_rows(2))
    with pytest.raises(UserError, match=r"data\.mix\[0\]: weight must be positive"):
        splits(f"data.path={main}", f"data.mix=[{{path: {main}, weight: 0}}]")


def test_eval_path_gives_an_eval_split(tmp_path):
    data = splits(f"data.path={jsonl(tmp_path / 't.jsonl', alpaca_rows(6))}",
                  f"data.eval_path={jsonl(tmp_path / 'e.jsonl', alpaca_rows(2, ' held out'))}")[0]
    assert (len(data["train"]), len(data["eval"])) == (6, 2)
    assert all(q.endswith("held out") for q in questions(data["eval"]))


@pytest.mark.parametrize("val_size, held_out", [("0.25", 5), ("3", 3)])
def test_val_size_holds_out_a_fraction_or_a_count_without_overlap(tmp_path, val_size, held_out):
    data = splits(f"data.path={jsonl(tmp_path / 't.jsonl', alpaca_rows(20))}", f"data.val_size={val_size}")[0]
    assert len(data["eval"]) == held_out and len(data["train"]) == 20 - held_out
    assert not set(questions(data["eval"])) & set(questions(data["train"]))


def test_val_size_that_leaves_nothing_to_train_on_is_an_error(tmp_path):
    with pytest.raises(UserError, match="data.val_size=5"):
        splits(f"data.path={jsonl(tmp_path / 't.jsonl', alpaca_rows(5))}", "data.val_size=5")


def test_max_samples_caps_each_source(tmp_path):
    main = jsonl(tmp_path / "main.jsonl", alpaca_rows(10))
    train = splits(f"data.path={main}", "data.max_samples=4", f"data.mix=[{{path: {main}}}]")[0]["train"]
    assert len(train) == 8


def test_preference_and_sft_data_cannot_be_mixed(tmp_path):
    sft = jsonl(tmp_path / "sft.jsonl", alpaca_rows(2))
    pref = jsonl(tmp_path / "pref.jsonl", [{"prompt": "2+3?", "chosen": "5", "rejected": "6"}])
    with pytest.raises(UserError, match="preference data"):
        splits(f"data.path={sft}", f"data.mix=[{{path: {pref}}}]")


def test_no_data_path_says_how_to_give_one():
    with pytest.raises(UserError, match="data.path="):
        splits()


def test_an_edited_file_is_read_again_not_served_from_the_cache(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", alpaca_rows(3))
    assert len(splits(f"data.path={path}")[0]["train"]) == 3
    jsonl(path, alpaca_rows(4, " edited"))
    train = splits(f"data.path={path}")[0]["train"]
    assert len(train) == 4 and questions(train)[0].endswith("edited")
