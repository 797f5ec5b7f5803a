"""What `distributed=` refuses before any weight is read, and what it no longer refuses: every engine trains on CPU
with several processes (tests/e2e/test_distributed.py runs them), so only the launch itself can be wrong."""

from __future__ import annotations

import pytest

from finetune import config
from finetune.errors import UserError
from finetune.train.distributed import Launch, check

ONE_CPU = Launch(rank=0, world_size=1, local_rank=0, use_cpu=True)
TWO_CPUS = Launch(rank=0, world_size=2, local_rank=0, use_cpu=True)


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "zero3_offload", "fsdp"])
@pytest.mark.parametrize("recipe", ["tiny_qwen2_5_lora", "tiny_qwen2_5_full", "tiny_qwen2_5_qlora"])
def test_every_engine_and_method_may_start_on_two_cpu_processes(engine, recipe, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check(config.load(recipe, [f"distributed={engine}"]), TWO_CPUS)


def test_fsdp_in_one_process_is_refused_with_the_launch_line(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(UserError, match=r"distributed=fsdp shards the model across processes.*"
                                        r"accelerate launch --multi_gpu --num_processes N"):
        check(config.load("tiny_qwen2_5_lora", ["distributed=fsdp"]), ONE_CPU)


def test_an_accelerate_config_for_another_engine_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(UserError, match="launched this run with fsdp, but the recipe says distributed=zero3"):
        check(config.load("tiny_qwen2_5_lora", ["distributed=zero3"]), TWO_CPUS)
