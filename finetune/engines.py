"""What each `distributed=` choice runs on: one table, read by training (which engine to start) and by the
estimator (what each rank holds). Light on purpose: the estimator imports it without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from finetune.schema import Distributed


@dataclass(frozen=True)
class Engine:
    launcher: Optional[str]  # what an accelerate config must launch: "deepspeed", "fsdp", or None (plain / DDP)
    deepspeed_config: Optional[str] = None  # the shipped JSON under recipes/deepspeed/
    shards_weights: bool = False  # each rank holds a slice of the weights (QLoRA then stores 4-bit weights in
    # the compute dtype, and samples are not generated: no rank holds the whole model)
    offload: bool = False  # weights, master copies and optimizer states in CPU memory


ENGINES: dict[Distributed, Engine] = {
    "none": Engine(launcher=None),  # one process; DDP when a launcher starts several
    "ddp": Engine(launcher=None),
    "zero2": Engine(launcher="deepspeed", deepspeed_config="zero2.json"),
    "zero3": Engine(launcher="deepspeed", deepspeed_config="zero3.json", shards_weights=True),
    "zero3_offload": Engine(launcher="deepspeed", deepspeed_config="zero3_offload.json", shards_weights=True,
                            offload=True),
    "fsdp": Engine(launcher="fsdp", shards_weights=True),
}


def zero3(dist: str) -> bool:
    """DeepSpeed ZeRO stage 3: the engine partitions the parameters themselves."""
    engine = ENGINES[dist]  # type: ignore[index]
    return engine.launcher == "deepspeed" and engine.shards_weights
