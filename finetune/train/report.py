"""The human side of a run: sample answers before and after training, the loss curve, and report.md.

Sample prompts are the held-out examples themselves, cut where their first trained token starts: exactly the
inference prompt of the family's template (system + user + assistant marker), so the samples show what the
deployed model will answer, with the reference answer next to it. A recipe that holds nothing out samples its
first training examples instead, and report.md says so: an answer to a prompt the model trained on shows that it
learnt the data, not that it generalises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from datasets import DatasetDict

from finetune import atomic
from finetune.data import kinds
from finetune.models.chat.labels import first_answer
from finetune.rundir import RunDir
from finetune.runfiles import RunSummary

if TYPE_CHECKING:
    from rich.console import Console

    from finetune.train.session import Session

GIB = 2**30
MAX_NEW_TOKENS = 64


@dataclass
class Sample:
    prompt_ids: list[int]
    reference_ids: list[int]
    trained_on: bool = False  # a training example (the recipe held nothing out), not an unseen one
    before: str = ""
    after: str = ""


def held_out(splits: DatasetDict, count: int) -> list[Sample]:
    """The first `count` eval examples (train examples when there is no eval split) as prompt + reference."""
    trained_on = "eval" not in splits
    split = splits["train"] if trained_on else splits["eval"]
    samples: list[Sample] = []
    kind = kinds.of(split.column_names)
    for row in split.select(range(min(count, len(split)))):
        if kind in ("paired", "unpaired"):  # the chosen answer (KTO: the judged answer, good or bad)
            samples.append(Sample(list(row["prompt_ids"]), list(row[kinds.RENDERED[kind][1]]), trained_on))
            continue
        ids, labels = list(row["input_ids"]), list(row["labels"])
        if "seq_lengths" in row:  # a packed row: its first example only
            ids, labels = ids[:row["seq_lengths"][0]], labels[:row["seq_lengths"][0]]
        answer = first_answer(labels)
        if answer is None:
            continue  # plain text (everything trained) has no prompt to ask
        first, end = answer
        samples.append(Sample(ids[:first], ids[first:end], trained_on))
    return samples


@torch.no_grad()
def generate(model: Any, tokenizer: Any, samples: list[Sample], stop_ids: list[int], attr: str) -> None:
    """Greedy answers (deterministic, no RNG used) into `sample.<attr>`; the model's train/eval mode is kept, and
    so are its 4-bit layers: on a CPU with AVX512-bf16, bitsandbytes 0.50 repacks a 4-bit layer for its inference
    kernel the first time the layer runs in eval mode, and a repacked layer fails in training ("a view of a leaf
    Variable that requires grad is being used in an in-place operation"), so the layers are told not to."""
    if not samples:
        return
    was_training = model.training
    packing = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for module in packing:
        module.support_avx512bf16_for_cpu = False
    model.eval()
    device = next(model.parameters()).device
    for sample in samples:
        ids = torch.tensor([sample.prompt_ids], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0], use_cache=True)
        setattr(sample, attr, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    for module in packing:
        module.support_avx512bf16_for_cpu = True


def loss_curve(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Train and eval loss against the optimizer step, as a PNG (written whole, then renamed)."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (evals, "eval", "o--")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return atomic.write_figure(path, fig, dpi=100, bbox_inches="tight")


def _gib(value: Optional[float]) -> str:
    return "—" if value is None else f"{value / GIB:.2f} GiB"


def _fence(text: str) -> str:
    return "```\n" + text.replace("```", "ˋˋˋ") + "\n```"


def memory_rows(summary: RunSummary) -> list[tuple[str, str]]:
    """The estimate next to the measured figure that measures the same thing: on a GPU the peak the allocator
    reserved; on a CPU what training added to the process's RSS after the model loaded (the libraries, the data
    and the weights were resident before), set against the estimate's terms above the weights."""
    memory = summary.memory
    if "gpu_peak_reserved_bytes" in memory:
        return [("memory estimate (per GPU)", _gib(summary.estimate_peak_bytes)),
                ("measured peak (CUDA reserved)", _gib(memory["gpu_peak_reserved_bytes"]))]
    rows = [("memory estimate (per GPU)", _gib(summary.estimate_peak_bytes))]
    start, peak = memory.get("host_rss_at_train_start_bytes"), memory.get("host_peak_rss_bytes")
    if start is not None and peak is not None:
        return rows + [("estimate: training on top of the loaded weights (no CUDA context)",
                        _gib(summary.estimate_training_bytes)),
                       ("measured: peak RSS while training − RSS when it started (CPU process)", _gib(peak - start))]
    return rows + [("measured peak RSS (CPU process, libraries included)", _gib(peak))]


def write(run: RunDir, summary: RunSummary, samples: list[Sample], tokenizer: Any) -> Path:
    """report.md (and loss.png) for a finished run, from summary.json's figures and metrics.jsonl."""
    curve = loss_curve(run.metrics(), run.path / "loss.png")
    rows = [
        ("model", f"{summary.model} — {summary.source}"),
        ("method / stage", f"{summary.method} / {summary.stage}"),
        ("processes", f"{summary.world_size} × {summary.device}"),
        ("optimizer steps", summary.global_step),
        ("final train loss", _num(summary.final_loss)),
        ("final eval loss", _num(summary.final_eval_loss)),
        ("throughput", f"{summary.tokens_per_second:.0f} tokens/s" if summary.tokens_per_second else "—"),
        ("training time", f"{summary.train_runtime_s:.1f} s"),
        ("wall time (load, data, samples, save)", f"{summary.wall_s:.1f} s"),
        *memory_rows(summary),
    ]
    lines = [f"# {run.path.name}", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if curve:
        lines += [f"![loss curve]({curve.name})", ""]
    if samples:
        lines += _samples_heading(any(sample.trained_on for sample in samples))
        for n, sample in enumerate(samples, 1):
            lines += [f"### {n}", "", "Prompt:", "", _fence(tokenizer.decode(sample.prompt_ids)), "",
                      "Reference:", "", _fence(tokenizer.decode(sample.reference_ids, skip_special_tokens=True)), "",
                      "Before:", "", _fence(sample.before), "", "After:", "", _fence(sample.after), ""]
    lines += ["## Next", "", "```", summary.next, "```", ""]
    return atomic.write_text(run.report_file, "\n".join(lines))


def _samples_heading(trained_on: bool) -> list[str]:
    if not trained_on:
        return ["## Samples of held-out prompts", "",
                f"Greedy, at most {MAX_NEW_TOKENS} new tokens, before and after training.", ""]
    return ["## Samples of training prompts", "",
            f"Greedy, at most {MAX_NEW_TOKENS} new tokens, before and after training. The recipe held nothing out, "
            "so these prompts were trained on: a good answer shows the data was learnt, not that the model "
            "generalises (data.val_size=0.05 or data.eval_path=FILE holds examples out).", ""]


def _num(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4f}"



def announce(session: "Session") -> None:
    """The few facts worth reading once, before the progress bar takes over."""
    recipe, where = session.recipe, session.launch
    memory = session.estimate["verdict"] + (" (--force)" if session.estimate.get("forced") else "")
    resume = f", resuming from {session.checkpoint.name}" if session.checkpoint else ""
    session.console.print(f"[bold]model[/]   {recipe.model} — {session.model.source}\n"
                          f"[bold]memory[/]  {memory}\n"
                          f"[bold]launch[/]  {where.world_size} process(es) on {where.device.split(':')[0]}"
                          f"{' (gloo)' if where.use_cpu and where.world_size > 1 else ''}, "
                          f"distributed={recipe.distributed}{resume}\n"
                          f"[bold]run[/]     {session.run.path}")


def announce_model(console: "Console", trainer: Any) -> None:
    """Trainable parameters (after TRL attached the adapter) and the data the trainer got."""
    params = list(trainer.model.parameters())
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in params]  # ZeRO-3: the loaded slice is empty
    trainable, total = sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
    held_out = f", {len(trainer.eval_dataset):,} held out" if trainer.eval_dataset is not None else ""
    console.print(f"[bold]train[/]   {trainable:,} of {total:,} parameters trainable "
                  f"({100 * trainable / max(total, 1):.2f}%), {len(trainer.train_dataset):,} training rows{held_out}")

def training_bytes(estimate: dict[str, Any]) -> Optional[int]:
    """What the estimate says training adds to the loaded model (gradients, optimizer states, activations, logits)
    without the CUDA context and fragmentation: on a CPU, the figure the RSS growth during training measures."""
    parts = estimate.get("breakdown")
    if not parts:
        return None
    return sum(v for k, v in parts.items() if k not in ("weights", "trainable_weights", "overhead"))


def summarize(session: "Session", trainer: Any, metrics: dict[str, Any], peak: dict[str, int],
              ranks: list[dict[str, Any]], weights: Path) -> RunSummary:
    """summary.json: the figures of a finished run (losses, throughput, time, estimate vs measured memory), with
    every rank's own report (`ranks`) and where the weights were saved."""
    recipe, history = session.recipe, trainer.state.log_history
    losses = [row["loss"] for row in history if "loss" in row]
    evals = [row["eval_loss"] for row in history if "eval_loss" in row]
    tokens = next((row["num_tokens"] for row in reversed(history) if "num_tokens" in row), None)
    runtime = metrics.get("train_runtime") or 0.0
    return RunSummary(
        model=recipe.model, source=session.model.source, method=recipe.method, stage=recipe.stage,
        world_size=session.launch.world_size, device=session.launch.device.split(":")[0],
        global_step=trainer.state.global_step, final_loss=losses[-1] if losses else None,
        final_eval_loss=evals[-1] if evals else None, train_loss=metrics.get("train_loss"),
        train_runtime_s=runtime, train_tokens=tokens,
        tokens_per_second=tokens / runtime if tokens and runtime else None,
        wall_s=time.monotonic() - session.started, estimate_peak_bytes=session.estimate.get("peak_bytes"),
        estimate_training_bytes=training_bytes(session.estimate),
        memory=peak, resumed_from=str(session.checkpoint) if session.checkpoint else None,
        next=f"finetune export run={session.run.path} to={'merged' if recipe.stage == 'rm' else 'ollama'}",
        weights=str(weights), ranks=ranks, trust_remote_code=session.trust_remote_code)


def say_goodbye(console: "Console", summary: RunSummary, run: RunDir) -> None:
    """The last lines of a run: where the weights are, how it went, what to run next."""
    tps, loss = summary.tokens_per_second, summary.final_loss
    console.print(
        f"[bold green]trained[/] {summary.global_step} steps in {summary.train_runtime_s:.1f} s"
        f"{f', {tps:,.0f} tokens/s' if tps else ''}{f'; final loss {loss:.4f}' if loss is not None else ''}\n"
        f"[bold]weights[/] {summary.weights}\n[bold]report[/]  {run.report_file}\n"
        f"[bold]next[/]    {summary.next}")
