"""Throughput of `finetune` against a plain TRL SFTTrainer script with identical settings, and the gain from packing.

    .venv/bin/python scripts/bench_train.py [--model tiny_llama2] [--reps 5] [--steps 20] [--json]
    .venv/bin/python scripts/bench_train.py --real [--reps 3] [--steps 8] [--precision fp32|bf16]
        [--plain-precision fp32|bf16] [--without trained_positions_head]

Both trainers run in this one process, alternating (finetune first on even repetitions, plain TRL first on odd
ones), on the same model, the same token ids (data.build's rows, fed to both) and the same settings; one warm-up
pair is discarded. Throughput is TRL's own count of trained (non-pad) tokens over the Trainer's train_runtime, on
both sides, so it measures what the toolkit adds inside the training loop.

`--real`: the real Qwen2.5-Coder-0.5B-Instruct (scripts/fetch_real_model.py's GGUF; finetune dequantizes it once into
its cache and plain TRL loads that same directory), LoRA r16 on every block linear, max_length 256, micro batch 2,
adamw_torch, constant lr, LoRA dropout 0 (dropout draws random numbers, and the two loss curves should be the same
math: with it, they could only be compared in distribution), on zh + en records of 100-500 tokens built from the
shipped samples. It prints tokens/s per pair and the ratio, their median and spread, the peak memory of each run
(CUDA: max_memory_allocated; CPU: the process's resident memory above what it held before the run, sampled every
20 ms), the loss curves side by side with their largest relative difference, and MFU (scripts/mfu.py) against this
machine's own matmul peak in the run's dtype, measured in this run.

`--plain-precision` trains plain TRL in another dtype than ours (ours in bf16 against TRL's CPU default, fp32);
`--without trained_positions_head` runs ours without that lever (finetune.train.trl_compat: the LM head projects
every position, as TRL does on CPU), to measure what the lever gives.

On a shared 2-core machine the figures are noisy: read the median and the spread, not one repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

REL_LOSS_TOLERANCE = 1e-3
"""Same math, same rows, same order and seed: the curves may differ only by float reordering (e.g. fused vs unfused
kernels); 0.1% relative per logged step is far above that and far below any real difference in the training."""


@dataclass(frozen=True)
class Setting:
    """What both trainers get."""

    model: str
    data: Path
    steps: int = 20
    micro_batch: int = 4
    max_length: int = 256
    method: str = "lora"
    precision: str = "fp32"
    lr: float = 2e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ()  # () = the family's targets (every block linear)
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = False
    packing: bool = False
    liger: bool = False
    logging_steps: int = 5

    def overrides(self, out: Path) -> list[str]:
        kernels = ["train.kernels=liger"] if self.liger else []  # refused without a CUDA GPU and liger-kernel
        return [f"model={self.model}", f"method={self.method}", f"output_dir={out}", f"data.path={self.data}",
                "data.val_size=0", f"data.packing={str(self.packing).lower()}", f"train.max_steps={self.steps}",
                f"train.micro_batch={self.micro_batch}", "train.grad_accum=1", f"train.max_length={self.max_length}",
                f"train.lr={self.lr}", "train.warmup_ratio=0", "train.scheduler=constant",
                f"train.precision={self.precision}", f"train.optimizer={self.optimizer}",
                f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
                f"train.logging_steps={self.logging_steps}", f"train.save_steps={10 * self.steps}",
                "train.sample_prompts=0", f"lora.r={self.lora_r}", f"lora.alpha={self.lora_alpha}",
                f"lora.dropout={self.lora_dropout}", "seed=42", *kernels]

    def recipe(self, out: Path):
        from finetune import config

        return config.load(None, self.overrides(out))


def _plain_head() -> None:
    from finetune.train import trl_compat

    trl_compat.loss_head_on_trained_positions_only = contextlib.nullcontext


LEVERS = {"trained_positions_head": _plain_head}
"""What `--without` turns off in ours."""


@dataclass
class Run:
    tokens_per_s: float
    tokens: int
    runtime_s: float
    losses: list[float]
    peak: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, int]]:
    """The run's peak: CUDA's allocator figures, or on CPU the resident set above its level at the start (sampled:
    glibc gives large blocks back, so RSS falls between steps and only a sampler sees the top)."""
    out: dict[str, int] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
        return
    page = 4096

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * page

    start, top, stop = rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            top[0] = max(top[0], rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out.update(rss_above_start=max(top[0], rss()) - start)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_ours(s: Setting, work: Path) -> Run:
    """finetune's own training path (config → data → model → TRL trainer with our callbacks)."""
    from finetune.train import run

    with peak_memory(device()) as peak:
        result = run(s.recipe(work / f"ft-{time.monotonic_ns()}"), force=True)
    summary = json.loads(result.summary_file.read_text())
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines() if line.strip()]
    losses = [row["loss"] for row in rows if "loss" in row]
    return Run(summary["tokens_per_second"], summary["train_tokens"], summary["train_runtime_s"], losses, peak)


def plain_model(s: Setting, path: Path) -> torch.nn.Module:
    """The base as a TRL user loads it: 16-bit or fp32 weights, or bitsandbytes nf4 with double quantization."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[s.precision]
    kwargs: dict = {"dtype": dtype, "attn_implementation": "sdpa"}
    if s.method == "qlora":
        kwargs.update(dtype=torch.bfloat16, device_map={"": device()}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model if s.method == "qlora" else model.to(device())


def run_plain(s: Setting, work: Path) -> Run:
    """What a user would write with TRL alone: same model, same rows, same hyperparameters."""
    from peft import LoraConfig
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from finetune import data
    from finetune.models import hub
    from finetune.plan import OPTIMIZERS

    r = dataclasses.replace(s, liger=False).recipe(work / "unused")  # the rows; liger is a TRL flag here
    resolved = hub.resolve(r, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    train = data.build(r, tokenizer, resolved.spec.family.template)["train"]
    set_seed(42)  # LoRA's initial A matrices come from torch's generator: the same seed as finetune's session
    with peak_memory(device()) as peak:
        model = plain_model(s, resolved.path)
        config = SFTConfig(
            output_dir=str(work / f"plain-{time.monotonic_ns()}"), seed=42, data_seed=42, learning_rate=s.lr,
            lr_scheduler_type="constant", warmup_steps=0.0, max_steps=s.steps,
            per_device_train_batch_size=s.micro_batch, gradient_accumulation_steps=1,
            gradient_checkpointing=s.gradient_checkpointing, bf16=s.precision == "bf16", fp16=s.precision == "fp16",
            optim=OPTIMIZERS[s.optimizer], weight_decay=0.0, max_grad_norm=1.0, logging_steps=s.logging_steps,
            logging_first_step=True, save_strategy="no", report_to="none", remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, use_liger_kernel=s.liger,
            use_cpu=device() == "cpu")
        peft = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, task_type="CAUSAL_LM",
                          target_modules=list(s.lora_targets or resolved.spec.family.lora_targets))
        trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                             peft_config=peft)
        metrics = trainer.train().metrics
    history = trainer.state.log_history
    tokens = next(row["num_tokens"] for row in reversed(history) if "num_tokens" in row)
    del trainer, model
    return Run(tokens / metrics["train_runtime"], int(tokens), metrics["train_runtime"],
               [row["loss"] for row in history if "loss" in row], peak)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


# ----------------------------------------------------------------------------------------- data of real lengths
def write_realistic_data(path: Path, n: int = 200, seed: int = 0) -> Path:
    """Alpaca records of ~100-500 tokens, zh and en, from the shipped samples' real text: several of the sample
    questions asked at once and answered in turn, some followed by a paragraph of the general text. The shipped
    records alone are ~40 characters: far shorter than what people fine-tune on, and padding-dominated."""
    samples = json.loads((REPO / "data" / "alpaca_zh_en.json").read_text(encoding="utf-8"))
    paragraphs = [p.strip() for p in (REPO / "data" / "general_zh_en.txt").read_text(encoding="utf-8").split("\n\n")
                  if p.strip()]
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        picked = rng.sample(samples, rng.randint(3, 14))
        questions = "\n".join(f"{i}. {r['instruction']} {r.get('input', '')}".rstrip() for i, r in enumerate(picked, 1))
        answers = "\n".join(f"{i}. {r['output']}" for i, r in enumerate(picked, 1))
        extra = "\n\n".join(rng.sample(paragraphs, rng.randint(0, 2)))
        records.append({"instruction": f"Answer each question / 请逐条回答：\n{questions}", "input": "",
                        "output": answers + (f"\n\n{extra}" if extra else "")})
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- the two modes
def real_model_path() -> str:
    """The fetched GGUF: model=<it> makes finetune dequantize it once; plain TRL loads the same directory."""
    import fetch_real_model

    return str(fetch_real_model.fetch())


def flops_per_token(s: Setting, mean_len: float) -> float:
    """On the meta device (no memory, no time): the same model and LoRA both trainers train."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    import mfu
    from finetune.models import hub

    resolved = hub.resolve(s.recipe(Path(tempfile.gettempdir()) / "unused"), progress=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolved.path))
    model = get_peft_model(model, LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, task_type="CAUSAL_LM",
                                             target_modules=list(s.lora_targets or resolved.spec.family.lora_targets)))
    return mfu.flops_per_token(model, mean_len)


def mean_row_tokens(s: Setting) -> float:
    from transformers import AutoTokenizer

    from finetune import data
    from finetune.models import hub

    r = s.recipe(Path(tempfile.gettempdir()) / "unused")
    resolved = hub.resolve(r, progress=False)
    rows = data.build(r, AutoTokenizer.from_pretrained(resolved.path), resolved.spec.family.template)["train"]
    lengths = [sum(mask) for mask in rows["attention_mask"]]
    return statistics.mean(lengths)


def alternate(s: Setting, work: Path, reps: int, warmup: bool, plain: Optional[Setting] = None
              ) -> list[dict[str, Run]]:
    """`plain`: plain TRL's setting when it differs from ours (another dtype)."""
    plain = plain or s
    if warmup:
        run_ours(dataclasses.replace(s, steps=2), work), run_plain(dataclasses.replace(plain, steps=2), work)
    pairs = []
    for rep in range(reps):
        order = ("finetune", "plain") if rep % 2 == 0 else ("plain", "finetune")
        got = {name: run_ours(s, work) if name == "finetune" else run_plain(plain, work) for name in order}
        pairs.append(got)
        print(f"pair {rep + 1}/{reps} ({' then '.join(order)}): finetune {got['finetune'].tokens_per_s:.1f} tok/s, "
              f"plain TRL {got['plain'].tokens_per_s:.1f} tok/s, ratio "
              f"{got['finetune'].tokens_per_s / got['plain'].tokens_per_s:.3f}", file=sys.stderr, flush=True)
    return pairs


def real_main(args: argparse.Namespace, work: Path) -> dict:
    import mfu

    s = Setting(model=real_model_path(), data=write_realistic_data(work / "zh_en_realistic.json"), steps=args.steps,
                micro_batch=2, max_length=256, precision=args.precision, lr=2e-4, lora_r=16, lora_alpha=32,
                lora_dropout=0.0, logging_steps=1)
    plain_setting = dataclasses.replace(s, precision=args.plain_precision or args.precision)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peak_before = mfu.matmul_peak(dtypes[args.precision], device())
    plain_peak = peak_before if plain_setting.precision == args.precision else \
        mfu.matmul_peak(dtypes[plain_setting.precision], device())
    mean_len = mean_row_tokens(s)
    per_token = flops_per_token(s, mean_len)
    pairs = alternate(s, work, args.reps, warmup=not args.no_warmup, plain=plain_setting)
    peak_after = mfu.matmul_peak(dtypes[args.precision], device())
    peak = max(peak_before, peak_after)
    ours = [p["finetune"] for p in pairs]
    plain = [p["plain"] for p in pairs]
    curves = [(a, b) for p in pairs for a, b in zip(p["finetune"].losses, p["plain"].losses)]
    worst = max((abs(a - b) / max(abs(b), 1e-12) for a, b in curves), default=float("nan"))
    return {
        "mode": "real", "model": Path(s.model).name, "setting": {k: str(v) for k, v in dataclasses.asdict(s).items()},
        "device": device(), "threads": torch.get_num_threads(), "mean_row_tokens": mean_len,
        "plain_precision": plain_setting.precision, "without": args.without,
        "finetune_tokens_per_s": spread([r.tokens_per_s for r in ours]),
        "plain_trl_tokens_per_s": spread([r.tokens_per_s for r in plain]),
        "ratio": spread([a.tokens_per_s / b.tokens_per_s for a, b in zip(ours, plain)]),
        "pairs": [{name: dataclasses.asdict(run) for name, run in p.items()} for p in pairs],
        "loss_max_rel_diff": worst, "loss_tolerance": REL_LOSS_TOLERANCE, "losses_match": worst <= REL_LOSS_TOLERANCE,
        "flops_per_token": per_token, "matmul_peak_flops": {"before": peak_before, "after": peak_after},
        "mfu": {"finetune": statistics.median(r.tokens_per_s for r in ours) * per_token / peak,
                "plain": statistics.median(r.tokens_per_s for r in plain) * per_token / plain_peak},
    }


def print_real(result: dict) -> None:
    r, gib = result["ratio"], 2**30
    print(f"finetune vs plain TRL on {result['model']} ({result['device']}, {result['threads']} threads, "
          f"{result['setting']['precision']} vs plain TRL {result['plain_precision']}"
          f"{''.join(f', without {w}' for w in result['without'])}, {len(result['pairs'])} alternating pairs of {result['setting']['steps']} "
          f"steps, mean row {result['mean_row_tokens']:.0f} tokens)")
    for i, pair in enumerate(result["pairs"], 1):
        a, b = pair["finetune"], pair["plain"]
        print(f"  pair {i}: finetune {a['tokens_per_s']:.1f} tok/s (peak {_peak(a['peak'], gib)}), plain TRL "
              f"{b['tokens_per_s']:.1f} tok/s (peak {_peak(b['peak'], gib)}), ratio "
              f"{a['tokens_per_s'] / b['tokens_per_s']:.3f}")
    print(f"ratio median {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}, stdev {r['stdev']:.3f}); "
          f"finetune {result['finetune_tokens_per_s']['median']:.1f}, plain TRL "
          f"{result['plain_trl_tokens_per_s']['median']:.1f} tokens/s (non-pad)")
    peaks = result["matmul_peak_flops"]
    print(f"MFU: finetune {100 * result['mfu']['finetune']:.1f}%, plain TRL {100 * result['mfu']['plain']:.1f}% "
          f"({result['flops_per_token'] / 1e9:.2f} GFLOP/token over a measured {result['setting']['precision']} "
          f"matmul peak of {max(peaks.values()) / 1e9:.0f} GFLOP/s; before/after {peaks['before'] / 1e9:.0f}/"
          f"{peaks['after'] / 1e9:.0f})")
    print("loss curves (pair 1): step  finetune  plain TRL")
    first = result["pairs"][0]
    for step, (a, b) in enumerate(zip(first["finetune"]["losses"], first["plain"]["losses"]), 1):
        print(f"  {step:4d}  {a:8.4f}  {b:8.4f}")
    verdict = "match" if result["losses_match"] else "DIFFER"
    print(f"losses {verdict}: largest relative difference {result['loss_max_rel_diff']:.2e} over every pair "
          f"(tolerance {result['loss_tolerance']:.0e})")


def _peak(peak: dict, gib: int) -> str:
    if "reserved" in peak:
        return f"{peak['allocated'] / gib:.2f} GiB allocated, {peak['reserved'] / gib:.2f} reserved"
    return f"RSS +{peak.get('rss_above_start', 0) / gib:.2f} GiB"


def tiny_main(args: argparse.Namespace, work: Path) -> dict:
    s = Setting(model=args.model, data=REPO / "data" / args.data, steps=args.steps, micro_batch=args.micro_batch,
                max_length=args.max_length)
    pairs = alternate(s, work, args.reps, warmup=not args.no_warmup)
    packed, padded = [], []
    for rep in range(max(2, args.reps // 2)):
        for packing in ((True, False) if rep % 2 == 0 else (False, True)):
            (packed if packing else padded).append(run_ours(dataclasses.replace(s, packing=packing), work).tokens_per_s)
    ours = [p["finetune"].tokens_per_s for p in pairs]
    plain = [p["plain"].tokens_per_s for p in pairs]
    return {
        "mode": "tiny", "model": args.model, "data": args.data, "steps": args.steps, "micro_batch": args.micro_batch,
        "max_length": args.max_length, "threads": torch.get_num_threads(), "device": device(), "reps": args.reps,
        "finetune_tokens_per_s": spread(ours), "plain_trl_tokens_per_s": spread(plain),
        "ratio": spread([a / b for a, b in zip(ours, plain)]),
        "packing": {"packed_tokens_per_s": spread(packed), "padded_tokens_per_s": spread(padded),
                    "gain": spread([p / u for p, u in zip(packed, padded)])},
    }


def print_tiny(result: dict) -> None:
    r, g = result["ratio"], result["packing"]["gain"]
    print(f"finetune vs plain TRL ({result['model']}, {result['reps']} alternating reps, {result['steps']} steps each): "
          f"median ratio {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}, stdev {r['stdev']:.3f}); "
          f"finetune {result['finetune_tokens_per_s']['median']:.0f} tok/s, plain TRL "
          f"{result['plain_trl_tokens_per_s']['median']:.0f} tok/s")
    print(f"packing: effective tokens/s x{g['median']:.2f} (min {g['min']:.2f}, max {g['max']:.2f}) — "
          f"{result['packing']['packed_tokens_per_s']['median']:.0f} packed vs "
          f"{result['packing']['padded_tokens_per_s']['median']:.0f} padded tok/s")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="store_true", help="the real Qwen2.5-Coder-0.5B (see the module docstring)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="--real: the dtype both train in")
    parser.add_argument("--plain-precision", choices=("fp32", "bf16"), default=None,
                        help="--real: plain TRL's dtype when it differs from ours")
    parser.add_argument("--without", action="append", default=[], choices=tuple(LEVERS),
                        help="run ours without this lever (repeatable)")
    parser.add_argument("--model", default="tiny_llama2")
    parser.add_argument("--data", default="messages_system.jsonl", help="a file under data/")
    parser.add_argument("--reps", type=int, default=None, help="alternating pairs (default 5; --real 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 20; --real 8)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--no-warmup", action="store_true", help="skip the discarded warm-up pair")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    args.reps = args.reps or (3 if args.real else 5)
    args.steps = args.steps or (8 if args.real else 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    for lever in args.without:
        LEVERS[lever]()

    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        # libraries log to stdout (DeepSpeed, transformers' progress bar); stdout carries only the result
        result = (real_main if args.real else tiny_main)(args, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        (print_real if args.real else print_tiny)(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
