"""The CLI as a subprocess: help, listings, and bad input → one line, exit 2, no traceback, nothing written."""

import json

import pytest


def test_help_explains_the_commands(cli):
    out = cli("--help")
    assert out.returncode == 0
    for word in ("estimate", "export", "list recipes", "recommend", "gpus", "--dry-run"):
        assert word in out.stdout


def test_list_recipes_shows_every_shipped_recipe(cli):
    out = cli("list", "recipes", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["recipe"]: row for row in json.loads(out.stdout)}
    assert rows["qwen7b_qlora"]["method"] == "qlora"
    assert rows["baichuan2_13b_lora"]["model"] == "baichuan2_13b"
    assert "tiny_qwen2_5_lora" in rows


@pytest.mark.parametrize("args, fragment", [
    (["recipe=no_such"], "unknown recipe 'no_such'"),
    (["recipe=qwen7b_lora", "lora.rnk=8"], "unknown key 'lora.rnk' (did you mean: lora.r"),
    (["recipe=qwen7b_lora", "train.lr=fast"], "train.lr"),
    (["recipe=qwen7b_lora", "--dryrun"], "unexpected argument '--dryrun'"),
    (["trian", "recipe=qwen7b_lora"], "unknown command 'trian' (did you mean: train"),
    (["export", "to=gguf"], "needs run=DIR"),
    (["export", "run=nowhere", "too=gguf"], "unknown key 'too' (did you mean: to"),
])
def test_bad_input_is_one_clear_line_exit_2(cli, tmp_path, args, fragment):
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert fragment in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []  # no output directory, nothing half-written


def test_yaml_with_type_error_exits_2_and_writes_nothing(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: qwen2_5_7b\ntrain:\n  micro_batch: two\n")
    out = cli(f"recipe={bad}", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2
    assert "bad.yaml: key 'train.micro_batch'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_print_config_prints_the_resolved_recipe(cli):
    out = cli("recipe=qwen7b_qlora", "lora.r=8", "--print-config")
    assert out.returncode == 0, out.stderr
    assert "method: qlora" in out.stdout and "r: 8" in out.stdout
