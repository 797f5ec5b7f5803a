"""The preference, reward and RL stages end to end on the tiny Qwen2.5 (CPU), each through the real CLI
(`python -m finetune recipe=tiny_qwen2_5_<stage>`): a few steps on a fixed batch must move the stage's own
objective, and the run directory, report and export work as they do for SFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.rundir import RunDir

FAST = ("data.val_size=0", "train.grad_accum=1", "train.logging_steps=1", "train.save_steps=1000",
        "train.sample_prompts=0", "train.scheduler=constant", "lora.dropout=0", "train.lr=5e-3")
"""The same small batch every step (max_samples = one batch), so a learning objective must move."""


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def series(rows: list[dict], key: str) -> list[float]:
    return [row[key] for row in rows if key in row]


def train(cli, stage: str, out: Path, *extra: str) -> RunDir:
    done = cli(f"recipe=tiny_qwen2_5_{stage}", *FAST, f"output_dir={out}", *extra,
               env={"OMP_NUM_THREADS": "1"})  # tiny matmuls on a shared 2-core machine
    assert done.returncode == 0, done.stderr[-3000:]
    run = RunDir(out)
    assert run.summary_file.is_file() and run.report_file.is_file()
    assert json.loads(run.summary_file.read_text())["stage"] == stage
    return run


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_reference_free_preference_stages_widen_the_margin(cli, tmp_path, stage):
    run = train(cli, stage, tmp_path / stage, "data.max_samples=2", "train.micro_batch=2", "train.max_steps=4")
    rows = metrics(run.path)
    losses, margins = series(rows, "loss"), series(rows, "rewards/margins")
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert margins[-1] > margins[0] and margins[-1] > 0, margins
    assert run.has_adapter and not (run.adapter_dir / "ref").exists()


def test_kto_learns_from_unpaired_answers(cli, tmp_path):
    run = train(cli, "kto", tmp_path / "kto", "data.max_samples=2", "train.micro_batch=4", "train.max_steps=5")
    rows = metrics(run.path)
    losses, margins = series(rows, "loss"), series(rows, "rewards/margins")
    assert losses[0] == pytest.approx(0.5, abs=1e-4)  # policy == reference at step 1: sigmoid(0) for both halves
    assert losses[-1] < losses[0] and margins[-1] > 0.05, (losses, margins)
    assert run.has_adapter


def test_kto_trains_on_records_judged_one_by_one(cli, tmp_path):
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "label": ok}
               for q, a, ok in (("2+3?", "5", True), ("2+3?", "6", False), ("Capital of France?", "Paris.", True),
                                ("Capital of France?", "Rome.", False))]
    path = tmp_path / "judged.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = train(cli, "kto", tmp_path / "kto", f"data.path={path}", "data.format=auto", "train.micro_batch=4",
                "train.max_steps=4")
    margins = series(metrics(run.path), "rewards/margins")
    assert margins[0] == 0 and margins[-1] > 0.05, margins


def test_reward_model_ranks_chosen_first_and_exports_with_its_head(cli, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = train(cli, "rm", tmp_path / "rm", "data.max_samples=2", "train.micro_batch=2", "train.max_steps=4")
    rows = metrics(run.path)
    losses, accuracy = series(rows, "loss"), series(rows, "accuracy")
    assert losses[-1] < losses[0] and accuracy[-1] == 1.0, (losses, accuracy)
    assert "score" in json.loads((run.adapter_dir / "adapter_config.json").read_text())["modules_to_save"]

    refused = cli("export", f"run={run.path}", "to=gguf")
    assert refused.returncode == 2 and "reward model" in refused.stderr and "Traceback" not in refused.stderr
    done = cli("export", f"run={run.path}", "to=merged")
    assert done.returncode == 0, done.stderr[-3000:]
    merged = AutoModelForSequenceClassification.from_pretrained(run.export_dir("merged"), dtype=torch.float32)
    base = AutoModelForSequenceClassification.from_pretrained(run.base().path, dtype=torch.float32, num_labels=1)
    trained = PeftModel.from_pretrained(base, run.adapter_dir).eval()
    ids = torch.tensor([[9707, 11, 1879, 0, 151645]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trained(ids).logits, atol=2e-2)  # f16 export of an fp32 run


def test_grpo_raises_the_users_reward(cli, tmp_path):
    """12 steps on one prompt: the user's reward (the share of even token ids) goes from chance (~0.5) to ~1. The
    recipe samples among the top 2 tokens: a random tiny model's distribution is near uniform over 152k tokens and
    too flat to learn from in a few steps (measured, seeds 42/1/2/3: first three steps 0.49–0.61, last three
    0.84–1.0)."""
    (tmp_path / "my_rewards.py").write_text(
        "def even_tokens(completion_ids, **_):\n"
        "    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]\n")
    env = {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = cli("recipe=tiny_qwen2_5_grpo", *FAST, "train.lr=2e-2", f"output_dir={tmp_path / 'grpo'}",
               "data.max_samples=1", "train.max_steps=12", "reward.fn=my_rewards:even_tokens,length", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = RunDir(tmp_path / "grpo")
    rows = [row for row in metrics(run.path) if "reward" in row]
    assert len(rows) == 12 and all("loss" in row and "rewards/length/mean" in row for row in rows)
    even = [row["rewards/even_tokens/mean"] for row in rows]
    assert sum(even[-3:]) / 3 > sum(even[:3]) / 3 + 0.2, even
    assert run.has_adapter and json.loads(run.summary_file.read_text())["stage"] == "grpo"

    bad = cli("recipe=tiny_qwen2_5_grpo", f"output_dir={tmp_path / 'bad'}", "reward.fn=no_such_module:score",
              env=env)
    assert bad.returncode != 0 and "reward.fn=no_such_module:score: cannot import no_such_module" in bad.stderr
    assert not (tmp_path / "bad").exists()


# PEFT variants and method=freeze: in-process (`finetune.train.run`, what `finetune recipe=...` calls), since the
# checks need the trainer's own objects (its optimizer) and a subprocess per variant would cost more than training.

CHAT = Path(__file__).resolve().parents[2] / "data" / "messages_system.jsonl"


def sft(out: Path, *extra: str):
    from finetune import config
    from finetune.train import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(config.load("tiny_qwen2_5_lora", [*FAST, f"output_dir={out}", f"data.path={CHAT}",
                                                      "data.max_samples=2", "train.micro_batch=2", "train.max_steps=3",
                                                      "train.save_steps=3", "train.lr=1e-2", *extra]))
    finally:
        torch.set_num_threads(threads)


PROBE = [[9707, 11, 1879, 0, 151645, 198]]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(PROBE)).logits


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_apply_to_the_original_base(tmp_path, init):
    """PiSSA/OLoRA train against a base they changed; the saved adapter is converted so that the ORIGINAL base plus
    the adapter (and the merged export) is the model training produced."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from finetune.export.merge import merge

    run = sft(tmp_path / init, f"lora.init={init}")
    assert losses_fall(run.path)
    base_path = run.base().path
    trained_cfg = json.loads((run.checkpoints_dir / "checkpoint-3" / "adapter_config.json").read_text())
    # the model as training left it: the base changed by the same (deterministic) init, the step-3 adapter on it
    residual = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), LoraConfig(
        r=trained_cfg["r"], lora_alpha=trained_cfg["lora_alpha"], target_modules=trained_cfg["target_modules"],
        init_lora_weights=init, task_type="CAUSAL_LM"))
    set_peft_model_state_dict(residual, load_file(run.checkpoints_dir / "checkpoint-3" / "adapter_model.safetensors"))
    expected = logits(residual.eval())

    saved = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == 2 * trained_cfg["r"] and saved["init_lora_weights"] is True  # an ordinary LoRA adapter
    on_original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                            run.adapter_dir).eval()
    assert torch.allclose(logits(on_original), expected, atol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(merge(run, tmp_path / "merged"), dtype=torch.float32)
    assert torch.allclose(logits(merged), expected, atol=2e-2)  # f16 export of an fp32 run
    untouched = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    assert not torch.allclose(logits(untouched), expected, atol=1e-3)  # training did change the model


def losses_fall(run_path: Path) -> bool:
    loss = series(metrics(run_path), "loss")
    return len(loss) == 3 and loss[-1] < loss[0]


def test_rslora_lora_plus_and_neftune_reach_the_trainer(tmp_path, monkeypatch):
    import peft.optimizers

    made = []
    real = peft.optimizers.create_loraplus_optimizer

    def spy(model, optimizer_cls, **kwargs):
        made.append(real(model, optimizer_cls, **kwargs))
        return made[-1]

    monkeypatch.setattr(peft.optimizers, "create_loraplus_optimizer", spy)
    run = sft(tmp_path / "variants", "lora.rslora=true", "lora.plus_ratio=16", "train.neftune_alpha=5")
    assert losses_fall(run.path)
    assert json.loads((run.adapter_dir / "adapter_config.json").read_text())["use_rslora"] is True
    lrs = {group["lr"] for group in made[0].param_groups if group["params"]}
    assert lrs == {1e-2, 16 * 1e-2}  # A at train.lr, B at plus_ratio × train.lr
    args = torch.load(run.checkpoints_dir / "checkpoint-3" / "training_args.bin", weights_only=False)
    assert args.neftune_noise_alpha == 5


def test_freeze_trains_only_the_last_layers_and_saves_a_full_model(tmp_path):
    from safetensors.torch import load_file

    run = sft(tmp_path / "freeze", "method=freeze", "freeze.layers=1", "train.lr=1e-3")
    assert losses_fall(run.path) and run.has_full_model
    before = {k: v for f in run.base().directory.glob("*.safetensors") for k, v in load_file(f).items()}
    after = {k: v for f in run.model_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    last = max(int(k.split(".")[2]) for k in before if k.startswith("model.layers."))
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(f"model.layers.{last}.") for k in changed), sorted(changed)


def test_a_stage_run_resumes_like_sft(cli, tmp_path):
    """Two steps, then `resume=` to four: the same run directory continues from its checkpoint."""
    out = tmp_path / "kto"
    args = ("data.max_samples=2", "train.micro_batch=4", "train.save_steps=2")
    first = train(cli, "kto", out, *args, "train.max_steps=2")
    assert (first.checkpoints_dir / "checkpoint-2").is_dir()
    resumed = train(cli, "kto", out, *args, "train.max_steps=4", f"resume={out}")
    summary = json.loads(resumed.summary_file.read_text())
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("checkpoint-2")
    assert [row["step"] for row in metrics(out) if "loss" in row] == [1, 2, 3, 4]
