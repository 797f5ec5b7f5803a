"""The kind of a dataset is one explicit value (finetune.data.kinds): every format has one, every loaded and rendered
split tells it, and the shipped preference recipes detect every preference layout the README lists."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from finetune import config, shipped
from finetune.data import build_preference, formats, inspect, kinds, load, render_inspect
from finetune.errors import UserError
from finetune.models.tokenizers import bundled_tokenizer

PREFERENCE_STAGES = ("dpo", "kto", "orpo", "simpo", "rm")
PROMPT = [{"role": "system", "content": "Be brief.", "tool_calls": None},
          {"role": "user", "content": "What is 2 plus 3?", "tool_calls": None}]
LAYOUTS = {  # README's preference layouts, each as its authors write it
    "TRL, text": {"system": "Be brief.", "prompt": "What is 2 plus 3?", "chosen": "5.", "rejected": "6."},
    "TRL, conversational": {"prompt": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "What is 2 plus 3?"}],
                            "chosen": [{"role": "assistant", "content": "5."}],
                            "rejected": [{"role": "assistant", "content": "6."}]},
    "LLaMA-Factory sharegpt": {"conversations": [{"from": "human", "value": "What is 2 plus 3?"}],
                               "system": "Be brief.",
                               "chosen": {"from": "gpt", "value": "5."}, "rejected": {"from": "gpt", "value": "6."}},
    "messages": {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "What is 2 plus 3?"}],
                 "chosen": {"role": "assistant", "content": "5."}, "rejected": {"role": "assistant", "content": "6."}},
    "LLaMA-Factory alpaca": {"instruction": "What is", "input": "2 plus 3?", "system": "Be brief.",
                             "chosen": "5.", "rejected": "6."},
}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


def preference_recipes() -> list[str]:
    names = sorted(p.stem for p in shipped.package_path("recipes").glob("*.yaml"))
    return [name for name in names if config.load(name).stage in PREFERENCE_STAGES]


def test_every_format_has_a_kind_whose_columns_its_rows_hold():
    for fmt in formats.FORMATS:
        kind = formats.kind_of(fmt)
        assert set(kinds.LOADED[kind]) <= set(formats.features(fmt)), fmt
        assert kinds.of(formats.features(fmt)) == kind, fmt


@pytest.mark.parametrize("kind", sorted(kinds.RENDERED))
def test_a_rendered_split_tells_its_kind(kind):
    assert kinds.of([*kinds.RENDERED[kind], "_src", "_row"]) == kind


def test_a_reward_models_whole_sequences_are_still_pairs():
    assert kinds.of(["chosen_ids", "rejected_ids"]) == "paired"


def test_columns_of_no_kind_are_a_programming_error():
    with pytest.raises(ValueError, match="no kind"):
        kinds.of(["text"])


def test_shipped_preference_recipes_detect_the_layout():
    names = preference_recipes()
    assert {config.load(name).stage for name in names} == set(PREFERENCE_STAGES)
    for name in names:
        assert config.load(name).data.format == "auto", name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_readme_preference_layout_loads_through_the_shipped_dpo_recipe(tmp_path, layout):
    path = tmp_path / "dpo.json"  # LLaMA-Factory ships its DPO demos as one JSON array
    path.write_text(json.dumps([LAYOUTS[layout]] * 3, ensure_ascii=False), encoding="utf-8")
    recipe = config.load("tiny_qwen2_5_dpo", [f"data.path={path}", "data.val_size=0"])
    data, dropped, kind = load.load_splits(recipe)
    assert kind == "paired" and dropped == {} and len(data["train"]) == 3
    row = data["train"][0]
    expected = PROMPT if layout != "LLaMA-Factory alpaca" else [
        PROMPT[0], {"role": "user", "content": "What is\n2 plus 3?", "tool_calls": None}]
    assert (row["prompt"], row["chosen"], row["rejected"]) == (expected, "5.", "6.")
    rows = build_preference(recipe, bundled_tokenizer("qwen2_5"), "qwen2_5")["train"]
    assert kinds.of(rows.column_names) == "paired"


@pytest.mark.parametrize("name", ["tiny_qwen2_5_orpo", "tiny_qwen2_5_simpo", "tiny_qwen2_5_rm", "tiny_qwen2_5_kto"])
def test_the_other_preference_recipes_read_llama_factorys_sharegpt_layout(tmp_path, name):
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps([LAYOUTS["LLaMA-Factory sharegpt"]]), encoding="utf-8")
    assert load.load_splits(config.load(name, [f"data.path={path}", "data.val_size=0"]))[2] == "paired"


def test_the_kto_recipe_reads_judged_answers_as_unpaired(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "2+3?"},
                                             {"role": "assistant", "content": "5"}], "label": True}) + "\n")
    assert load.load_splits(config.load("tiny_qwen2_5_kto", [f"data.path={path}", "data.val_size=0"]))[2] == "unpaired"


def test_finetune_data_shows_a_judged_answer_with_its_label(tmp_path):
    path = tmp_path / "kto.jsonl"
    rows = [{"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": answer}],
             "label": label} for answer, label in (("6", False), ("5", True))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = bundled_tokenizer("qwen2_5")
    report = inspect(config.load("tiny_qwen2_5_kto", [f"data.path={path}", "data.val_size=0"]), tok, "qwen2_5")
    assert report["kind"] == "unpaired" and report["count"] == 2
    console = Console(record=True, width=200)
    console.print(render_inspect(report, tok))
    text = console.export_text()
    assert "KTO data" in text and "judged bad (label False)" in text


def test_held_out_data_of_another_kind_is_refused_naming_both(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps(LAYOUTS["TRL, text"]) + "\n")
    with pytest.raises(UserError, match=r"data\.eval_path holds SFT data \(conversations\) but the training data is "
                                        r"preference data .*held-out data must be of the same kind"):
        load.load_splits(config.load("tiny_qwen2_5_dpo", [f"data.path={pref}", f"data.eval_path={sft}"]))
