"""Hold the dry run's per-process plan for distributed=zero2|zero3|fsdp against what each rank really allocates, on
CPU at reduced real widths (no GPU: two processes over gloo).

    accelerate launch --multi_gpu --num_processes 2 --mixed_precision no --dynamo_backend no \
        scripts/bench_memory_ranks.py --engine zero3 --method lora --json out.json

Each rank builds the reduced-width model as training builds it (scripts/bench_memory.py `prepare`, after the
trainer's arguments exist: ZeRO-3 then partitions the weights as they are made), then trains real steps through
the Trainer training uses: TRL's SFTTrainer with our trainer arguments (finetune/train/session.py trainer_args,
the engine's DeepSpeed JSON or FSDP config from finetune/train/distributed.py, the FSDP plugin handed back by
`engage`). Real tensors, since the collectives move real data; bench_memory's allocation tracker (Timeline) records
every storage each rank makes and frees from before the model is built to the end. Per rank:
  weights       the module's parameters and buffers as the engine holds them when the optimizer steps (a ZeRO-3
                partition, an FSDP shard), with DeepSpeed's fp32 master partitions (the plan's trainable_weights)
  optimizer     the optimizer's state tensors then (DeepSpeed's inner torch optimizer; FSDP's sharded states)
  gradients     everything else alive when the optimizer steps (the fullest call of the second step: DeepSpeed
                steps once per parameter group): gradient partitions, their fp32 copies, the engine's buckets
                (weights and states as above, read at that moment); against the plan's optimizer step
  peak          the most alive at once from the first step's start to the last step's end (the plan's peak
                without the CUDA-side `overhead`). Not the load: on CPU the model is built whole in the same memory
                before the engine shards it, where a GPU run builds it in host RAM (FSDP's cpu_ram_efficient_loading,
                the Trainer's move to the device); nor the checkpoint saved after the last step.
  sharded       (zero3, fsdp) the same weights against the plan's weights without its gathered parameters
                (finetune/estimate/memory.py gathered_bytes), which exist only while units run
torch's AdamW steps all tensors at once (foreach), as on a GPU; meta tensors (DeepSpeed's shape records) hold no
memory and are not counted.
Rank 0 prints the table (markdown) and, with --json, writes every rank's figures.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_memory  # noqa: E402  (scripts/ is not a package)

from finetune import config  # noqa: E402
from finetune.config import Recipe  # noqa: E402
from finetune.engines import ENGINES  # noqa: E402
from finetune.estimate.activations import dtype_bytes  # noqa: E402
from finetune.estimate.memory import gathered_bytes, plan  # noqa: E402
from finetune.estimate.params import facts  # noqa: E402
from finetune.models import tokenizers  # noqa: E402
from finetune.models.registry import ModelSpec  # noqa: E402
from finetune.train import distributed  # noqa: E402
from finetune.train.distributed import Launch  # noqa: E402

REDUCED = {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 8192}
"""Qwen2.5-7B's shape narrowed as tests/unit/test_estimate_real_widths.py narrows it."""
MODEL, LAYERS, LENGTH, STEPS = "qwen2_5_7b", 2, 128, 2
TERMS = ("weights", "sharded", "gradients", "optimizer", "peak")


def recipe(engine: str, method: str) -> Recipe:
    """The method's base recipe under `engine` on 2 processes, bf16 (the plan's 16-bit DeepSpeed engine), one
    sequence of LENGTH tokens a step, LoRA dropout 0."""
    return config.load(f"base/{method}", [
        f"model={MODEL}", f"distributed={engine}", "num_gpus=2", f"train.max_length={LENGTH}",
        "train.micro_batch=1", "train.grad_accum=1", "train.precision=bf16", "lora.dropout=0",
        f"train.max_steps={STEPS}", "train.save_steps=1000", "train.logging_steps=1000", "train.sample_prompts=0",
        "train.scheduler=constant"])


def spec() -> ModelSpec:
    return bench_memory.with_layers(MODEL, LAYERS, **REDUCED)


class RankTimeline(bench_memory.Timeline):
    """bench_memory's tracker, seeing through DTensors (FSDP2's shards: their local tensor is the memory) and
    storages resized in place (FSDP2 frees an unsharded parameter with `storage.resize_(0)` and gathers it back
    into the same storage, outside the dispatcher): what is alive is read from the storages themselves after
    every op, and `peak` is the most seen so far, without the CPU-only loss tiles."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0
        self._storages: dict[int, tuple[int, weakref.ref]] = {}  # StorageImpl address -> (allocation id, storage)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {local(t).untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and local(t).untyped_storage()._cdata not in inputs:
                self._made(local(t).untyped_storage())
        self.peak = max(self.peak, self.live_bytes())
        return out

    def _made(self, storage: torch.UntypedStorage) -> None:
        if storage.device.type == "meta":  # shape records (DeepSpeed's round_robin_bit16_meta): no memory
            return
        super()._made(storage)
        self._storages[storage._cdata] = self._live[storage._cdata], weakref.ref(storage)

    def live_bytes(self) -> int:
        """Bytes alive now in the storages this timeline saw made, at their present size."""
        total = 0
        for address, (uid, ref) in list(self._storages.items()):
            storage = ref()
            if storage is None or self._live.get(address) != uid:
                del self._storages[address]
            elif uid not in self.cpu_only:
                total += storage.nbytes()
        return total


@contextlib.contextmanager
def _foreach_adamw():
    """torch's AdamW steps as it does on a GPU, all tensors at once (foreach: one temporary the size of what it
    steps), where on a CPU it defaults to one tensor at a time (two temporaries the size of the largest tensor:
    sqrt, then the division; DeepSpeed's flat fp32 partition is one tensor). The plan counts the GPU's."""
    adam = importlib.import_module("torch.optim.adam")  # torch.optim's namespace hides the module's name
    original = adam._default_to_fused_or_foreach
    adam._default_to_fused_or_foreach = lambda *_, **__: (False, True)
    try:
        yield
    finally:
        adam._default_to_fused_or_foreach = original


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank; any other tensor as it is."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def storages(tensors) -> dict[int, int]:
    """Storage -> bytes, each once (DeepSpeed's partitions, FSDP's local shards)."""
    found = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = local(t).untyped_storage()
            found[s._cdata] = s.nbytes()
    return found


def innermost(optimizer):
    """The torch optimizer under accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def held(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Weights (module parameters, ZeRO-3 partitions, buffers, the optimizer's own parameter copies: DeepSpeed's
    fp32 partitions, which ZeRO-3 hands the optimizer only while it steps) and optimizer states this rank holds."""
    inner = innermost(optimizer)
    module = [getattr(p, "ds_tensor", p) for p in model.parameters()] + list(model.buffers())
    masters = [p for group in inner.param_groups for p in group["params"]] + list(inner.state)
    weights = storages(module) | storages(masters)
    states = storages(v for s in inner.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"weights": sum(weights.values()), "optimizer": sum(states.values())}


def estimated(r: Recipe) -> dict[str, int]:
    """The plan's per-process figures for the measured terms, at its optimizer step (the moment measured)."""
    s = spec()
    p = plan(r, s, num_gpus=2)
    step = p.phases["optimizer step"]
    weights = step["weights"] + step["trainable_weights"]
    sharded = ({"sharded": weights - gathered_bytes(facts(r, s), dtype_bytes(r), r.distributed)}
               if ENGINES[r.distributed].shards_weights else {})
    return {"weights": weights, "gradients": step["gradients"], "optimizer": p.phases["backward end"]["optimizer"],
            "peak": max(sum(v for k, v in m.items() if k != "overhead") for m in p.phases.values()), **sharded}


def dataset(r: Recipe):
    """Random full-length rows in our data's columns (input_ids, labels, attention_mask)."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(r.seed)
    rows = [torch.randint(0, REDUCED["vocab_size"], (LENGTH,), generator=gen).tolist() for _ in range(2 * STEPS * 2)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows, "attention_mask": [[1] * LENGTH for _ in rows]})


def measure(r: Recipe, where: Launch, out: Path) -> dict:
    """Train STEPS steps as training does (checkpoints under `out`), on this rank's timeline; this rank's
    figures."""
    from transformers import AutoTokenizer, TrainerCallback

    from finetune.rundir import RunDir
    from finetune.train import session, sft

    s = spec()
    run = session.Session(r, where, s, None, RunDir(out), None, {}, None, 0.0, None)
    args = session.trainer_args(sft.STAGE.config, run, has_eval=False, **sft.options(r, {"train": dataset(r)}))
    timeline = RankTimeline()
    marks: dict[str, int] = {}

    class Moments(TrainerCallback):
        def on_step_begin(self, *_, **__):
            marks.pop("step_live", None)
            if "trained" not in marks:  # the peak of training, from the first step: not the load (module doc)
                timeline.peak = timeline.live_bytes()

        def on_step_end(self, *_, **__):  # before the Trainer saves a checkpoint: saving is not training
            marks["trained"] = timeline.peak

    def before_step(optimizer, *_):
        """The fullest optimizer call of the last step stands (the states exist by then). DeepSpeed steps its torch
        optimizer once per parameter group (and ZeRO-3 per sub-group), each with that group's gradients."""
        if hasattr(optimizer, "optimizer"):  # a wrapper (accelerate's, DeepSpeed's) steps its torch optimizer
            return
        live = timeline.live_bytes()
        if live > marks.get("step_live", -1):
            marks.update(held(model, optimizer), step_live=live)
            marks["gradients"] = live - marks["weights"] - marks["optimizer"]

    hook = register_optimizer_step_pre_hook(before_step)
    try:
        # a GPU folds TRL's loss tiles in registers
        with _foreach_adamw(), timeline, bench_memory._tiles_cpu_only(timeline):
            model = bench_memory.prepare(r, s, "cpu")
            for p in model.parameters():  # ZeRO-3 made its partitions uninitialised: a finite loss needs values
                getattr(p, "ds_tensor", p).data.fill_(bench_memory.STD)
            tokenizer = AutoTokenizer.from_pretrained(tokenizers.bundled_tokenizer_dir(s.family.name))
            trainer = sft.STAGE.trainer(r)(model=model, args=args, train_dataset=dataset(r),
                                           processing_class=tokenizer, callbacks=[Moments()])
            distributed.engage(r, trainer, where)
            trainer.train()
    finally:
        hook.remove()
    return {term: marks[term] for term in ("weights", "gradients", "optimizer")} | {
            "sharded": marks["weights"], "peak": marks["trained"],
            "engine": distributed.engine_name(trainer.accelerator), "rank": where.rank}


def error_pct(estimate: int, measured: int) -> float:
    return 100 * (estimate - measured) / measured if measured else 0.0


def table(engine: str, method: str, estimate: dict[str, int], ranks: list[dict]) -> str:
    """Markdown: each term's estimate, each rank's measurement (MiB) and the estimate's error against it."""
    mib = 2**20
    terms = [t for t in TERMS if t in estimate and not (t == "weights" and "sharded" in estimate)]  # a shard: sharded
    rows = [f"| {engine} | {method} | {term} | {estimate[term] / mib:.2f} | "
            + " | ".join(f"{r[term] / mib:.2f} ({error_pct(estimate[term], r[term]):+.1f}%)" for r in ranks) + " |"
            for term in terms]
    header = ("engine", "method", "term", "estimate MiB", *(f"rank {r['rank']} MiB (error)" for r in ranks))
    return "\n".join(bench_memory.table(header, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("zero2", "zero3", "fsdp"), required=True)
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--json", type=Path, help="rank 0 writes the estimate and every rank's figures here")
    a = parser.parse_args(argv)
    r = recipe(a.engine, a.method)
    estimate = estimated(r)  # outside the timeline
    where = distributed.launch(r)
    with tempfile.TemporaryDirectory(prefix="ranks-") as out:
        ranks = where.gather(measure(r, where, Path(out)))
    if where.is_main:
        print(table(a.engine, a.method, estimate, ranks), flush=True)
        if a.json:
            a.json.write_text(json.dumps({"engine": a.engine, "method": a.method, "estimate": estimate,
                                          "ranks": ranks}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
