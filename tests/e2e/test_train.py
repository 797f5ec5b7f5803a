"""Training end to end on tiny models of every family (CPU): full, LoRA, QLoRA and DoRA learn, the trainer sees
exactly our labels, weights reload to the same logits, the run directory holds everything the issue lists, and a
run that will not fit, or would clobber a run, is refused before any weight is read.

The method × family matrix calls `finetune.train.run` in-process — the function `finetune recipe=...` calls —
since starting a Python process per cell would cost more than the training; the CLI itself runs as a
subprocess in test_resume.py and test_distributed.py (and its exit codes in test_cli.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune import config, data
from finetune.errors import UserError, WontFitError
from finetune.models import registry
from finetune.train import run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: a second OpenMP thread only waits for the first (10-100x slower
    under load), so these tests compute on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

REPO = Path(__file__).resolve().parents[2]
CHAT = REPO / "data" / "messages_system.jsonl"
MULTI_TURN = REPO / "data" / "sharegpt_multiturn.jsonl"
LR = {"full": 1e-3, "lora": 1e-2, "qlora": 1e-2}


def tiny(model: str, method: str, out: Path, *extra: str) -> config.Recipe:
    """A tiny run: a fixed 2-example dataset seen again every step, so a learning model's loss must fall."""
    return config.load(None, [
        f"model={model}", f"method={method}", f"output_dir={out}", f"data.path={CHAT}", "data.max_samples=2",
        "data.val_size=0", "train.max_steps=3", "train.micro_batch=2", "train.grad_accum=1", "train.max_length=256",
        f"train.lr={LR[method]}", "train.warmup_ratio=0", "train.scheduler=constant", "train.precision=fp32",
        "train.gradient_checkpointing=false", "train.logging_steps=1", "train.save_steps=1000",
        "train.sample_prompts=0", "lora.r=8", "lora.alpha=16", "lora.dropout=0", "quant.compute_dtype=fp32",
        *extra])


def losses(run_path: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


FAMILY_MODELS = ["tiny_chatglm3", "tiny_baichuan2_7b", "tiny_qwen1", "tiny_qwen2_5", "tiny_llama2"]


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_every_family_and_method_learns_the_fixed_examples(tmp_path, model, method):
    result = run(tiny(model, method, tmp_path / "run"))
    loss = losses(result.path)
    assert len(loss) == 3 and loss[-1] < loss[0] - 0.05, loss
    assert (result.has_full_model if method == "full" else result.has_adapter)
    summary = json.loads(result.summary_file.read_text())
    assert summary["global_step"] == 3 and summary["tokens_per_second"] > 0
    if method == "qlora":
        adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
        assert set(adapter["target_modules"]) == set(registry.spec(model).family.lora_targets)


def test_alibi_13b_class_trains_with_dora(tmp_path):
    result = run(tiny("tiny_baichuan2_13b", "lora", tmp_path / "run", "lora.dora=true"))
    loss = losses(result.path)
    assert loss[-1] < loss[0] - 0.05, loss
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["use_dora"] is True


class Spy:
    """Records the trainer object and the batches its loss sees, around the real TRL methods (nothing replaced)."""

    def __init__(self, monkeypatch, trainer_class) -> None:
        self.trainer, self.batches = None, []
        train, compute_loss = trainer_class.train, trainer_class.compute_loss

        def spy_train(trainer, *args, **kwargs):
            self.trainer = trainer
            return train(trainer, *args, **kwargs)

        def spy_loss(trainer, model, inputs, *args, **kwargs):
            if model.training:
                self.batches.append({k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
            return compute_loss(trainer, model, inputs, *args, **kwargs)

        monkeypatch.setattr(trainer_class, "train", spy_train)
        monkeypatch.setattr(trainer_class, "compute_loss", spy_loss)


@pytest.mark.parametrize("layout", ["padded", "padding_free", "packed"])
def test_trainer_sees_exactly_our_labels(tmp_path, monkeypatch, layout):
    """Baichuan2 multi-turn: the eos label under a user token is a substitution no mask-based collator keeps.
    padded: micro-batches of one (attention mask, no padding-free); padding_free: every larger micro-batch
    (finetune.train.sft.padding_free); packed: data.packing."""
    from trl import SFTTrainer

    spy = Spy(monkeypatch, SFTTrainer)
    micro_batch = 1 if layout == "padded" else 4
    recipe = tiny("tiny_baichuan2_7b", "lora", tmp_path / "run", f"data.path={MULTI_TURN}", "data.max_samples=4",
                  f"train.max_steps={4 // micro_batch}", f"train.micro_batch={micro_batch}",
                  f"data.packing={str(layout == 'packed').lower()}")
    run(recipe)
    rows = data.build(recipe, spy.trainer.processing_class, "baichuan2")["train"]
    expected = dict(examples(rows))
    assert any(i == 195 and label == 2 for ids, labels in expected.items() for i, label in zip(ids, labels))
    seen = 0
    for batch in spy.batches:
        if layout != "padded":  # padding-free: the micro-batch as one row, examples back to back, no attention mask
            assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
            pieces = [(batch["input_ids"][0, a:b], batch["labels"][0, a:b]) for a, b in zip(starts, starts[1:])]
        else:
            assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
            pieces = [(ids[mask.bool()], labels[mask.bool()])
                      for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
        for ids, labels in pieces:
            assert labels.tolist() == expected[tuple(ids.tolist())]
            seen += 1
    assert seen == 4


def examples(rows) -> list[tuple[tuple[int, ...], list[int]]]:
    """(input ids, labels) of every example the data module built, packed rows split back into examples."""
    out = []
    for row in rows:
        bounds = [0]
        for length in row.get("seq_lengths") or [len(row["input_ids"])]:
            bounds.append(bounds[-1] + length)
        out += [(tuple(row["input_ids"][a:b]), row["labels"][a:b]) for a, b in zip(bounds, bounds[1:])]
    return out


@pytest.mark.parametrize("method, extra", [("lora", ()), ("lora", ("lora.dora=true",)), ("full", ())])
def test_saved_weights_reload_to_the_same_logits(tmp_path, monkeypatch, method, extra):
    from peft import PeftModel
    from trl import SFTTrainer

    spy = Spy(monkeypatch, SFTTrainer)
    result = run(tiny("tiny_llama2", method, tmp_path / "run", "train.max_steps=2", *extra))
    trained = spy.trainer.model.eval()
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 2]])
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        if method == "full":
            again = AutoModelForCausalLM.from_pretrained(result.model_dir)
        else:
            base = AutoModelForCausalLM.from_pretrained(json.loads(result.base_file.read_text())["path"])
            again = PeftModel.from_pretrained(base, result.adapter_dir)
        got = again.eval()(input_ids=ids).logits
    assert torch.equal(got, want)
    assert (result.path / ("model" if method == "full" else "adapter") / "tokenizer_config.json").is_file()


def test_run_directory_holds_report_curve_samples_and_estimate(tmp_path):
    result = run(tiny("tiny_llama2", "lora", tmp_path / "run", "data.max_samples=6", "data.val_size=2",
                      "train.max_steps=4", "train.eval_steps=2", "train.sample_prompts=1", "report_to=tensorboard"))
    for name in ("recipe.yaml", "base.json", "estimate.json", "metrics.jsonl", "summary.json", "report.md",
                 "loss.png", "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json"):
        assert (result.path / name).is_file(), name
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    summary = json.loads(result.summary_file.read_text())
    assert summary["estimate_peak_bytes"] > 0 and summary["memory"]["host_peak_rss_bytes"] > 0
    assert summary["final_eval_loss"] is not None and summary["next"] == f"finetune export run={result.path} to=ollama"
    report = result.report_file.read_text()
    memory = summary["memory"]  # CPU: what training added to the RSS, beside the estimate above the weights
    assert 0 < memory["host_rss_at_train_start_bytes"] <= memory["host_peak_rss_bytes"] + 2**20  # tiny: ~no growth
    assert summary["estimate_training_bytes"] > 0
    for fragment in ("![loss curve](loss.png)", "tokens/s", "memory estimate", "measured: peak RSS while training",
                     "Before:", "After:", "[/INST]", "finetune export run="):
        assert fragment in report, fragment
    assert list((result.checkpoints_dir / "runs").glob("*/events.out.tfevents.*"))
    assert json.loads(result.estimate_file.read_text())["fits"] is None  # CPU: nothing to compare against


def test_an_existing_run_is_never_overwritten(tmp_path):
    first = tiny("tiny_llama2", "lora", tmp_path / "run", "train.max_steps=1")
    run(first)
    before = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run; pass overwrite=true"):
        run(first)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_refuses_to_start_when_it_will_not_fit_without_loading_weights(tmp_path, monkeypatch):
    """qwen2_5_7b is not on this machine: any attempt to resolve or load it would fail differently."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = config.load(None, ["model=qwen2_5_7b", "method=full", "gpu_mem=1", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(WontFitError) as refused:
        run(recipe)
    message = str(refused.value)
    assert "does not fit" in message and "--dry-run" in message and "--force" in message
    assert "Try: " in message  # the cheapest fixes, each with its new estimate
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_directory(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "broken", "output": \n')
    out = tmp_path / "run"
    recipe = config.load("tiny_qwen2_5_lora", [f"data.path={broken}", f"output_dir={out}"])
    with pytest.raises(UserError, match="broken.jsonl: 1 of 2 records is malformed: line 2"):
        run(recipe)
    assert not out.exists()
