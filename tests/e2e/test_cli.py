"""The CLI as a subprocess: help, listings, and bad input → one line, exit 2, no traceback, nothing written."""

import json

import pytest


def test_help_explains_the_commands(cli):
    out = cli("--help")
    assert out.returncode == 0
    for word in ("estimate", "export", "list recipes", "recommend", "gpus", "--dry-run"):
        assert word in out.stdout


def test_listing_is_the_output_on_stdout_so_it_pipes(cli):
    out = cli("list", "recipes")
    assert out.returncode == 0, out.stderr
    qwen = [line for line in out.stdout.splitlines() if "qwen7b_qlora" in line]  # what `| grep qwen` sees
    assert qwen and "qlora" in qwen[0]
    assert "qwen7b_qlora" not in out.stderr


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


def test_list_models_is_the_registry_with_predicted_memory(cli):
    out = cli("list", "models", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["model"]: row for row in json.loads(out.stdout)}
    assert {"chatglm3_6b", "baichuan2_13b", "qwen1_7b", "qwen2_5_7b", "llama2_7b"} <= set(rows)
    glm = rows["chatglm3_6b"]
    assert glm["modelscope_id"] == "ZhipuAI/chatglm3-6b" and "registration" in glm["commercial_use"]
    lora = next(v for k, v in glm.items() if k.startswith("lora_gib"))
    qlora = next(v for k, v in glm.items() if k.startswith("qlora_gib"))
    assert 0 < qlora < lora  # computed by the estimator, not hand-written


def test_gpus_says_plainly_when_there_is_none(cli):
    from finetune.estimate import gpu

    if gpu.detect():
        pytest.skip("this machine has a GPU: the 'none found' message cannot show here")
    out = cli("gpus")
    assert out.returncode == 0, out.stderr
    assert "no NVIDIA GPU found" in out.stdout


def test_dry_run_verdicts_and_exit_codes(cli, tmp_path):
    fits = cli("recipe=qwen7b_qlora", "--dry-run", "gpu_mem=24", f"output_dir={tmp_path / 'a'}")
    assert fits.returncode == 0, fits.stderr
    assert "fits" in fits.stdout and "7,615,616,512" in fits.stdout  # the report is the output
    assert "7,615,616,512" not in fits.stderr
    too_big = cli("recipe=qwen7b_full", "--dry-run", "gpu_mem=24", "num_gpus=1", "distributed=none",
                  f"output_dir={tmp_path / 'b'}")
    assert too_big.returncode == 3 and "method=lora" in too_big.stdout  # ranked fixes, each re-estimated
    assert list(tmp_path.iterdir()) == []  # a dry run loads and writes nothing


def test_estimate_json_has_the_agreed_keys(cli):
    out = cli("estimate", "recipe=baichuan2_13b_qlora", "gpu_mem=16", "--json")
    report = json.loads(out.stdout)  # stdout is exactly one JSON object
    assert report["params_total"] == 13_896_668_160
    assert {"params_trainable", "peak_bytes", "breakdown", "gpus", "fits", "suggestions"} <= set(report)
    assert out.returncode == (0 if report["fits"] else 3)


def test_recommend_ranks_what_fits(cli):
    out = cli("recommend", "gpu_mem=12", "lang=zh", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows and all(r["peak_bytes"] <= 12 * 2**30 for r in rows)
    assert all("zh" in r["languages"] or r["variant"] == "zh" for r in rows)  # zh: Chinese-LLaMA-2


def test_estimate_compares_with_the_plain_stack_term_by_term(cli, tmp_path):
    plain = cli("estimate", "recipe=qwen7b_qlora", "gpu_mem=24", "--json", "--compare")
    assert plain.returncode in (0, 3), plain.stderr
    report = json.loads(plain.stdout)
    compare = report["compare"]
    assert isinstance(compare["peak_bytes"], int) and compare["peak_bytes"] == sum(compare["breakdown"].values())
    assert set(compare["breakdown"]) == set(report["breakdown"])
    assert compare["peak_bytes"] > report["peak_bytes"]  # fp32 logits and the fp32 upcast cost memory
    assert compare["breakdown"]["logits"] > 0 and compare["breakdown"]["weights"] > report["breakdown"]["weights"]
    ours_like_theirs = json.loads(cli("estimate", "recipe=qwen7b_qlora", "gpu_mem=24", "--json",
                                      "train.logits=full", "quant.upcast=true").stdout)
    assert ours_like_theirs["peak_bytes"] == compare["peak_bytes"]  # the new keys plan what --compare shows
    assert "compare" not in json.loads(cli("estimate", "recipe=qwen7b_qlora", "--json").stdout)
    table = cli("estimate", "recipe=qwen7b_qlora", "gpu_mem=24", "--compare")
    dry_run = cli("recipe=qwen7b_qlora", "--dry-run", "gpu_mem=24", f"output_dir={tmp_path / 'run'}")
    for out in (table, dry_run):
        assert out.returncode == 0, out.stderr
        assert "plain stack" in out.stdout and "train.logits=full quant.upcast=true" in out.stdout
        assert "CPU-measured" in out.stdout and "assumed" in out.stdout  # which terms rest on what
    bad = cli("estimate", "recipe=qwen7b_qlora", "train.logits=fused")
    assert bad.returncode == 2 and "train.logits=fused is not one of chunked, full" in bad.stderr


def test_trainer_runs_the_full_logits_loss_and_the_fp32_upcast(cli, tmp_path):
    run = tmp_path / "run"
    out = cli("recipe=tiny_qwen2_5_qlora", "train.logits=full", "quant.upcast=true", f"output_dir={run}",
              "data.max_samples=4", "data.val_size=0", "train.max_steps=2", "train.micro_batch=2",
              "train.logging_steps=1", "train.save_steps=1000", "train.sample_prompts=0",
              env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in rows if "loss" in row]
    assert not any("mean_token_accuracy" in row for row in rows)  # transformers' loss, not TRL's chunked head
    estimate = json.loads((run / "estimate.json").read_text())
    assert estimate["logits"] == "full" and estimate["upcast"] is True
