"""Recipes: composition, override precedence, and one clear error per mistake."""

from pathlib import Path

import pytest

from finetune import config, schema
from finetune.errors import UserError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_recipe_extends_base_and_overrides_win(tmp_path):
    write(tmp_path / "base.yaml", "method: lora\ntrain:\n  lr: 1.0e-4\n  max_length: 1024\nlora:\n  r: 8\n")
    child = write(tmp_path / "child.yaml", "extends: base\nmodel: qwen2_5_7b\ntrain:\n  lr: 3.0e-4\n")
    recipe = config.load(str(child), ["lora.r=32"])
    assert recipe.train.lr == 3.0e-4  # child over base
    assert recipe.train.max_length == 1024  # inherited from base
    assert recipe.lora.r == 32  # override over everything
    assert recipe.train.micro_batch == schema.TrainConfig().micro_batch  # schema default underneath
    assert recipe.name == "child"


def test_later_base_wins_over_earlier(tmp_path):
    write(tmp_path / "a.yaml", "train:\n  lr: 1.0e-4\n  epochs: 5\n")
    write(tmp_path / "b.yaml", "train:\n  lr: 2.0e-4\n")
    child = write(tmp_path / "c.yaml", "extends: [a, b]\nmodel: qwen2_5_7b\n")
    recipe = config.load(str(child))
    assert (recipe.train.lr, recipe.train.epochs) == (2.0e-4, 5)


def test_shipped_recipe_composes_its_base():
    recipe = config.load("qwen7b_qlora")
    assert (recipe.model, recipe.variant, recipe.method) == ("qwen2_5_7b", "instruct", "qlora")
    assert recipe.quant.type == "nf4" and recipe.quant.double_quant
    assert recipe.train.optimizer == "paged_adamw_8bit"


def test_every_shipped_recipe_validates():
    names = config.shipped_recipes()
    models = {"chatglm3_6b", "qwen7b", "qwen1_7b", "llama2_7b", "llama2_13b", "baichuan2_7b", "baichuan2_13b"}
    for model in models:
        for method in ("full", "lora", "qlora"):
            assert f"{model}_{method}" in names
    for name in names:
        assert config.load(name).model


@pytest.mark.parametrize("overrides, fragment", [
    (["lora.rnk=8"], "unknown key 'lora.rnk' (did you mean: lora.r"),
    (["train.lr=fast"], "key 'train.lr'"),
    (["method=qlorra"], "method=qlorra is not one of full, lora, qlora, freeze (did you mean: qlora"),
    (["model=qwen2_5_7bb"], "did you mean: qwen2_5_7b"),
    (["train.micro_batch=0"], "train.micro_batch must be positive"),
    (["variant=chat"], "no variant 'chat'"),
    (["lr"], "is not key=value"),
])
def test_bad_overrides_give_one_clear_line(overrides, fragment):
    with pytest.raises(UserError) as info:
        config.load("qwen7b_lora", overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_recipe_names_closest():
    with pytest.raises(UserError, match="did you mean: qwen7b_qlora"):
        config.load("qwen7b_qlroa")


def test_type_error_in_yaml_names_the_file_and_key(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model: qwen2_5_7b\ntrain:\n  micro_batch: two\n")
    with pytest.raises(UserError, match=r"bad\.yaml: key 'train.micro_batch'"):
        config.load(str(bad))


def test_misspelled_key_in_yaml_is_named(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model: qwen2_5_7b\ntrian:\n  lr: 1\n")
    with pytest.raises(UserError, match="unknown key 'trian' \\(did you mean: train"):
        config.load(str(bad))


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "extends: b\n")
    write(tmp_path / "b.yaml", "extends: a\n")
    with pytest.raises(UserError, match="cycle"):
        config.load(str(tmp_path / "a.yaml"))


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    recipe = config.load("tiny_qwen2_5_lora", ["train.lr=5e-4", "data.columns.instruction=question"])
    saved = write(tmp_path / "recipe.yaml", config.to_yaml(recipe))
    assert config.from_yaml_file(saved) == recipe


def test_with_overrides_returns_changed_copy():
    recipe = config.load("qwen7b_lora")
    changed = config.with_overrides(recipe, ["train.micro_batch=1", "train.grad_accum=16"])
    assert (changed.train.micro_batch, changed.train.grad_accum) == (1, 16)
    assert recipe.train.micro_batch == 2


def test_user_recipe_dir_is_searched_first(tmp_path, monkeypatch):
    write(tmp_path / "qwen7b_lora.yaml", "extends: base/lora\nmodel: llama2_7b\n")
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "lora.yaml", "method: lora\n")
    monkeypatch.setenv("FINETUNE_RECIPES", str(tmp_path))
    assert config.load("qwen7b_lora").model == "llama2_7b"
