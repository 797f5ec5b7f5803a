"""One recipe key, `distributed=none|ddp|zero2|zero3|zero3_offload|fsdp`, mapped onto the engines that exist.

The launcher (`accelerate launch`, `torchrun`, or plain `python` for one process) decides how many processes run;
this module only reads what it set up and tells the Trainer which engine to use: DeepSpeed through the shipped
JSON configs (recipes/deepspeed/), FSDP through transformers' `fsdp_config`, DDP by default whenever more than one
process runs (zero3_offload brings its own optimizer, DeepSpeed's CPU AdamW: train.optimizer does not apply there).
Without a GPU every process trains on CPU over gloo (ddp; zero2 was seen working too) — `use_cpu=True` is what
makes the Trainer's accelerate state MULTI_CPU; without it each process would silently train alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from finetune import shipped
from finetune.config import Recipe
from finetune.engines import ENGINES
from finetune.errors import UserError
from finetune.schema import Distributed

FSDP_CONFIG = {
    "version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # wraps each decoder layer (the model's _no_split_modules)
    "state_dict_type": "FULL_STATE_DICT",  # saves one HF-loadable checkpoint, what export expects
    "cpu_ram_efficient_loading": True,  # rank 0 reads the weights, the others receive them
    "reshard_after_forward": True,
}


@dataclass(frozen=True)
class Launch:
    """Where this process stands: its rank among all processes, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    use_cpu: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        return "cpu" if self.use_cpu else f"cuda:{max(self.local_rank, 0)}"

    def share(self, value: Any) -> Any:
        """Rank 0's value on every rank (e.g. the run directory, whose name holds a timestamp)."""
        if self.world_size == 1:
            return value
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order, on every rank."""
        return [value] if self.world_size == 1 else list(gather_object([value]))

    def barrier(self) -> None:
        if self.world_size > 1:
            PartialState().wait_for_everyone()


def launch() -> Launch:
    """Join the process group the launcher prepared (a no-op for one process) and say where we stand."""
    use_cpu = not torch.cuda.is_available()
    state = PartialState(cpu=use_cpu)
    return Launch(rank=state.process_index, world_size=state.num_processes,
                  local_rank=state.local_process_index, use_cpu=use_cpu)


def _launcher_engine() -> str | None:
    """The engine an `accelerate launch --config_file ...` already chose through the environment, if any."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return None


def check(recipe: Recipe, where: Launch) -> None:
    """Refuse combinations that would fail late or do something else than the recipe says."""
    engine = _launcher_engine()
    if engine and engine != ENGINES[recipe.distributed].launcher:
        raise UserError(f"the accelerate config launched this run with {engine}, but the recipe says "
                        f"distributed={recipe.distributed}; set distributed= to match "
                        f"(zero2|zero3|zero3_offload for deepspeed, fsdp) or launch with recipes/accelerate/"
                        f"multi_gpu.yaml")
    if ENGINES[recipe.distributed].shards_weights and where.use_cpu:
        raise UserError(f"distributed={recipe.distributed} shards the weights across CUDA GPUs (DeepSpeed's ZeRO-3 "
                        f"init fails on CPU); on CPU use distributed=ddp or zero2 with `accelerate launch "
                        f"--multi_gpu --num_processes N` or torchrun")


def trainer_kwargs(recipe: Recipe, where: Launch) -> dict[str, Any]:
    """The TrainingArguments fields that select the engine (shared by the SFT and DPO configs)."""
    kwargs: dict[str, Any] = {"use_cpu": where.use_cpu}
    engine = ENGINES[recipe.distributed]
    if engine.launcher == "deepspeed":
        kwargs["deepspeed"] = str(deepspeed_config(recipe.distributed))
    elif engine.launcher == "fsdp":
        # FSDP checkpoints activations itself; the Trainer's gradient checkpointing would all-gather twice
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = {**FSDP_CONFIG, "activation_checkpointing": recipe.train.gradient_checkpointing}
        kwargs["gradient_checkpointing"] = False
    elif where.world_size > 1:  # none / ddp with several processes
        kwargs["ddp_find_unused_parameters"] = False  # every trainable weight gets a gradient in a causal LM
        kwargs["ddp_backend"] = "gloo" if where.use_cpu else None
    return kwargs


def deepspeed_config(name: Distributed) -> Path:
    """A shipped DeepSpeed JSON (recipes/deepspeed/); its "auto" values are filled from the recipe by the Trainer."""
    path = shipped.RECIPES / "deepspeed" / str(ENGINES[name].deepspeed_config)
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} is missing; reinstall finetune or pass distributed=ddp")
    return path


def rank_info(trainer: Any) -> dict[str, Any]:
    """What each rank reports about itself at the end (summary.json "ranks"): proof every process trained."""
    return {"rank": trainer.args.process_index, "pid": os.getpid(), "global_step": trainer.state.global_step,
            "device": str(trainer.args.device)}
