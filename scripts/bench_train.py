"""Throughput of `finetune` against a plain TRL SFTTrainer script with identical settings, and the gain from packing.

    .venv/bin/python scripts/bench_train.py [--model tiny_llama2] [--reps 5] [--steps 20] [--json]

Both trainers run in this one process, alternating (finetune first on even repetitions, plain TRL first on odd
ones), on the same tiny model, the same token ids (data.build's rows, fed to both) and the same settings; one
warm-up pair is discarded. Throughput is TRL's own count of trained (non-pad) tokens over the Trainer's
train_runtime, on both sides, so it measures what the toolkit adds inside the training loop (its callbacks:
metrics.jsonl, progress, Ctrl-C, memory). Packing: effective tokens/s of finetune with data.packing=true over
data.packing=false (padded batches spend compute on pad tokens; packed rows do not).
On a shared 2-core machine the figures are noisy: read the median and the spread, not one repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def recipe(model: str, out: Path, args: argparse.Namespace, packing: bool = False):
    from finetune import config

    return config.load(None, [
        f"model={model}", "method=lora", f"output_dir={out}", f"data.path={REPO / 'data' / args.data}",
        "data.val_size=0", f"data.packing={str(packing).lower()}", f"train.max_steps={args.steps}",
        f"train.micro_batch={args.micro_batch}", "train.grad_accum=1", f"train.max_length={args.max_length}",
        "train.lr=2e-3", "train.warmup_ratio=0", "train.scheduler=constant", "train.precision=fp32",
        "train.gradient_checkpointing=false", "train.logging_steps=5", f"train.save_steps={10 * args.steps}",
        "train.sample_prompts=0", "lora.r=8", "lora.alpha=16", "lora.dropout=0.05", "seed=42"])


def finetune_tps(model: str, work: Path, args: argparse.Namespace, packing: bool = False) -> float:
    from finetune.train import run

    result = run(recipe(model, work / f"ft-{time.monotonic_ns()}", args, packing))
    return json.loads(result.summary_file.read_text())["tokens_per_second"]


def plain_trl_tps(model: str, work: Path, args: argparse.Namespace) -> float:
    """What a user would write with TRL alone: same model, same rows, same hyperparameters."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from finetune import data
    from finetune.models import hub

    r = recipe(model, work / "unused", args)
    resolved = hub.resolve(r, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    train = data.build(r, tokenizer, resolved.spec.family.template)["train"]
    model_ = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32, attn_implementation="sdpa")
    config = SFTConfig(
        output_dir=str(work / f"plain-{time.monotonic_ns()}"), seed=42, data_seed=42, learning_rate=2e-3,
        lr_scheduler_type="constant", warmup_steps=0.0, max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1, gradient_checkpointing=False,
        bf16=False, fp16=False, optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, logging_steps=5,
        logging_first_step=True, save_strategy="no", report_to="none", remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, use_cpu=not torch.cuda.is_available())
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=list(resolved.spec.family.lora_targets))
    trainer = SFTTrainer(model=model_, args=config, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft)
    metrics = trainer.train().metrics
    tokens = next(row["num_tokens"] for row in reversed(trainer.state.log_history) if "num_tokens" in row)
    return tokens / metrics["train_runtime"]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_llama2")
    parser.add_argument("--data", default="messages_system.jsonl", help="a file under data/")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        # libraries log to stdout (DeepSpeed, transformers' progress bar); stdout carries only the result
        work = Path(tmp)
        finetune_tps(args.model, work, args), plain_trl_tps(args.model, work, args)  # warm-up, discarded
        ours, plain, ratios = [], [], []
        for rep in range(args.reps):
            order = ("finetune", "plain") if rep % 2 == 0 else ("plain", "finetune")
            got = {name: (finetune_tps if name == "finetune" else plain_trl_tps)(args.model, work, args)
                   for name in order}
            ours.append(got["finetune"])
            plain.append(got["plain"])
            ratios.append(got["finetune"] / got["plain"])
            print(f"rep {rep + 1}/{args.reps} ({' then '.join(order)}): finetune {got['finetune']:.0f} tok/s, "
                  f"plain TRL {got['plain']:.0f} tok/s, ratio {ratios[-1]:.3f}", file=sys.stderr, flush=True)
        packed, padded = [], []
        for rep in range(max(2, args.reps // 2)):
            for packing in ((True, False) if rep % 2 == 0 else (False, True)):
                (packed if packing else padded).append(finetune_tps(args.model, work, args, packing=packing))
        gains = [p / u for p, u in zip(packed, padded)]

    result = {
        "model": args.model, "data": args.data, "steps": args.steps, "micro_batch": args.micro_batch,
        "max_length": args.max_length, "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "reps": args.reps,
        "finetune_tokens_per_s": spread(ours), "plain_trl_tokens_per_s": spread(plain), "ratio": spread(ratios),
        "packing": {"packed_tokens_per_s": spread(packed), "padded_tokens_per_s": spread(padded),
                    "gain": spread(gains)},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r, g = result["ratio"], result["packing"]["gain"]
        print(f"finetune vs plain TRL ({args.model}, {args.reps} alternating reps, {args.steps} steps each): "
              f"median ratio {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}, stdev {r['stdev']:.3f}); "
              f"finetune {result['finetune_tokens_per_s']['median']:.0f} tok/s, plain TRL "
              f"{result['plain_trl_tokens_per_s']['median']:.0f} tok/s")
        print(f"packing: effective tokens/s x{g['median']:.2f} (min {g['min']:.2f}, max {g['max']:.2f}) — "
              f"{result['packing']['packed_tokens_per_s']['median']:.0f} packed vs "
              f"{result['packing']['padded_tokens_per_s']['median']:.0f} padded tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
