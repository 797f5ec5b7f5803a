"""One recipe key, `distributed=none|ddp|zero2|zero3|zero3_offload|fsdp`, mapped onto the engines that exist.

The launcher (`accelerate launch`, `torchrun`, or plain `python` for one process) decides how many processes run;
this module only reads what it set up and tells the Trainer which engine to use: DeepSpeed through the shipped
JSON configs (recipes/deepspeed/), FSDP2 through transformers' `fsdp_config`, DDP by default whenever more than one
process runs (zero3_offload brings its own optimizer, DeepSpeed's CPU AdamW: train.optimizer does not apply there).
Without a GPU every engine trains on CPU over gloo, LoRA, QLoRA and full fine-tuning alike (2 processes: the same
losses as DDP to 1e-7). Three things make that true, each a silent failure otherwise: `use_cpu=True` (or each process
trains alone), DeepSpeed wrapping our process group before the model loads (`launch`), and the FSDP plugin that
accelerate drops on CPU handed back (`engage`). Each rank reports the engine that actually ran (summary.json).
"""

from __future__ import annotations

import os
import socket
import warnings
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


def launch(recipe: Recipe) -> Launch:
    """Join the process group the launcher prepared (a no-op for one process) and say where we stand.

    DeepSpeed keeps its own view of the group: unless it wraps ours before the model is loaded, ZeRO-3's
    `zero.Init` (transformers calls it inside from_pretrained) sees a world of one and asserts on the batch size."""
    use_cpu = not torch.cuda.is_available()
    state = PartialState(cpu=use_cpu)
    if ENGINES[recipe.distributed].launcher == "deepspeed":
        import deepspeed

        if state.num_processes == 1:  # plain `python -m finetune`: a group of one on loopback, not MPI discovery
            for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                               "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
                os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="gloo" if use_cpu else None, verbose=False)
        if use_cpu:  # its gloo path calls torch's renamed collectives every step: one warning per call otherwise
            warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter|all_gather)_"
                                    r"(tensor|into_tensor)` is deprecated", category=FutureWarning)
    return Launch(rank=state.process_index, world_size=state.num_processes,
                  local_rank=state.local_process_index, use_cpu=use_cpu)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    if ENGINES[recipe.distributed].launcher == "fsdp" and where.world_size == 1:
        raise UserError("distributed=fsdp shards the model across processes, and this run is one process "
                        "(transformers: \"Using fsdp only works in distributed training\"); launch several with "
                        "`accelerate launch --multi_gpu --num_processes N -m finetune ...` (on CPU too) or torchrun, "
                        "or train one process with distributed=none")


def trainer_kwargs(recipe: Recipe, where: Launch) -> dict[str, Any]:
    """The TrainingArguments fields that select the engine (shared by the SFT and DPO configs)."""
    kwargs: dict[str, Any] = {"use_cpu": where.use_cpu}
    engine = ENGINES[recipe.distributed]
    if engine.launcher == "deepspeed":
        kwargs["deepspeed"] = str(deepspeed_config(recipe.distributed))
    elif engine.launcher == "fsdp":
        # FSDP checkpoints activations itself; the Trainer's gradient checkpointing would all-gather twice. The price:
        # accelerate recomputes without restoring the RNG (preserve_rng_state=False), so with dropout (lora.dropout)
        # the recomputed masks differ from the forward's: losses then drift from DDP's (3e-5 relative by step 4, seen)
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = {**FSDP_CONFIG, "activation_checkpointing": recipe.train.gradient_checkpointing}
        kwargs["gradient_checkpointing"] = False
    elif where.world_size > 1:  # none / ddp with several processes
        kwargs["ddp_find_unused_parameters"] = False  # every trainable weight gets a gradient in a causal LM
        kwargs["ddp_backend"] = "gloo" if where.use_cpu else None
    return kwargs


def engage(recipe: Recipe, trainer: Any, where: Launch) -> None:
    """Make the Trainer's accelerator run the engine the recipe names.

    accelerate switches to FSDP only for GPU-like process groups: on CPU (MULTI_CPU over gloo) it drops the plugin
    and silently trains plain DDP. torch's FSDP2 shards over gloo on CPU, so the plugin the Trainer built from
    `fsdp_config` is handed back before the model is prepared."""
    if ENGINES[recipe.distributed].launcher != "fsdp" or where.world_size == 1 or trainer.is_fsdp_enabled:
        return
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # each AcceleratorState() copies it back from here
    trainer.is_fsdp_enabled = True


def deepspeed_config(name: Distributed) -> Path:
    """A shipped DeepSpeed JSON (recipes/deepspeed/); its "auto" values are filled from the recipe by the Trainer."""
    path = shipped.RECIPES / "deepspeed" / str(ENGINES[name].deepspeed_config)
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} is missing; reinstall finetune or pass distributed=ddp")
    return path


def rank_info(trainer: Any) -> dict[str, Any]:
    """What each rank reports about itself at the end (summary.json "ranks"): proof every process trained."""
    return {"rank": trainer.args.process_index, "pid": os.getpid(), "global_step": trainer.state.global_step,
            "device": str(trainer.args.device), "engine": engine_name(trainer.accelerator)}


def engine_name(accelerator: Any) -> str:
    """What actually ran, as accelerate set it up ("DEEPSPEED zero3", "DEEPSPEED zero3 offload params+optimizer",
    "FSDP2", "MULTI_CPU", "NO"): a run that asked for an engine and silently got DDP, or ZeRO-3 without its
    offload, shows it here."""
    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED":
        name = f"DEEPSPEED zero{accelerator.state.deepspeed_plugin.zero_stage}"
        offloaded = _deepspeed_offload(accelerator)
        return f"{name} offload {'+'.join(offloaded)}" if offloaded else name
    if kind == "FSDP":
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return kind


def _deepspeed_offload(accelerator: Any) -> list[str]:
    """What the running DeepSpeed engine keeps off the accelerator (its resolved config, not the JSON asked for)."""
    wrapped = accelerator.deepspeed_engine_wrapped
    if wrapped is None:  # never prepared: nothing ran
        return []
    engine = wrapped.engine
    places = {"params": engine.zero_offload_param(), "optimizer": engine.zero_offload_optimizer()}
    return [what for what, offload in places.items() if offload is not None and offload.device != "none"]
