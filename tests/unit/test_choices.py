"""Every closed set of recipe choices is declared once (a Literal on its schema field) and handled by every module
that acts on it: adding a choice to the schema fails here until each consumer knows what to do with it."""

from __future__ import annotations

import pytest
from transformers.trainer_utils import SchedulerType

from finetune import config
from finetune.engines import ENGINES
from finetune.errors import UserError
from finetune.estimate.memory import plan
from finetune.models import registry
from finetune.train.distributed import Launch, deepspeed_config, trainer_kwargs
from finetune.train.model import DTYPES
from finetune.plan import OPTIMIZERS

CHOICE_KEYS = ["hub", "method", "stage", "distributed", "report_to", "data.format", "data.on_bad_record",
               "train.precision", "train.optimizer", "train.scheduler", "train.attn_implementation", "train.logits",
               "train.kernels",
               "quant.bits", "quant.type", "quant.compute_dtype", "dpo.loss", "lora.init"]


@pytest.mark.parametrize("key", CHOICE_KEYS)
def test_a_value_outside_the_choices_is_one_clear_error(key):
    allowed = config.choices(key)
    assert len(allowed) >= 2
    config.load(None, ["model=tiny_qwen2_5", f"{key}={allowed[-1]}"] +
                (["stage=dpo"] if key == "dpo.loss" else []))  # every declared choice is accepted
    with pytest.raises(UserError, match=rf"overrides: {key}=bogus is not one of {', '.join(map(str, allowed))}"):
        config.load(None, ["model=tiny_qwen2_5", f"{key}=bogus"])


def test_a_bad_choice_in_a_recipe_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: tiny_qwen2_5\ntrain:\n  optimizer: adamw\n")
    with pytest.raises(UserError, match=rf"{path}: train.optimizer=adamw is not one of .*did you mean"):
        config.load(str(path))


def test_open_keys_have_no_choices():
    assert config.choices("train.lr") == () and config.choices("data.path") == () and config.choices("model") == ()


def test_every_optimizer_has_a_trainer_name_and_a_memory_model():
    assert set(OPTIMIZERS) == set(config.choices("train.optimizer"))
    spec = registry.spec("qwen2_5_7b")
    states = {name: plan(config.load("qwen7b_lora", [f"train.optimizer={name}"]), spec).breakdown["optimizer"]
              for name in config.choices("train.optimizer")}
    assert states["sgd"] == 0 and all(states[name] > 0 for name in states if name != "sgd")
    assert states["adamw_8bit"] < states["adamw_torch"]


def test_every_distributed_choice_has_an_engine_a_trainer_setting_and_a_memory_model():
    assert set(ENGINES) == set(config.choices("distributed"))
    spec, two_gpus = registry.spec("qwen2_5_7b"), Launch(rank=0, world_size=2, local_rank=0, use_cpu=False)
    for name, engine in ENGINES.items():
        recipe = config.load("qwen7b_lora", [f"distributed={name}"])
        kwargs = trainer_kwargs(recipe, two_gpus)
        assert ("deepspeed" in kwargs) == (engine.launcher == "deepspeed") and kwargs.get("fsdp", False) == \
            (engine.launcher == "fsdp")
        if engine.deepspeed_config:
            assert deepspeed_config(name).is_file()
        assert plan(recipe, spec, num_gpus=2).peak_bytes > 0


def test_every_precision_has_a_dtype():
    assert set(DTYPES) == set(config.choices("quant.compute_dtype"))
    assert set(config.choices("train.precision")) == set(DTYPES) | {"auto"}  # auto resolves to one of them
    assert config.load(None, ["model=tiny_qwen2_5", "train.precision=auto"]).train.precision in DTYPES


def test_every_scheduler_is_one_transformers_knows():
    assert set(config.choices("train.scheduler")) <= {s.value for s in SchedulerType}


def test_every_data_format_has_a_reader():
    from finetune.data.formats import FORMATS

    assert set(FORMATS) | {"auto"} == set(config.choices("data.format"))


def test_every_stage_has_a_declaration_a_trainer_and_a_memory_model():
    from finetune import stages
    from finetune.train import stage_trainer

    assert set(stages.STAGES) == set(config.choices("stage"))
    spec = registry.spec("qwen2_5_7b")
    for stage in stages.STAGES:
        recipe = config.load("qwen7b_lora", [f"stage={stage}", "train.micro_batch=2"])
        assert callable(stage_trainer(recipe).options)
        for method in config.choices("method"):
            assert plan(config.with_overrides(recipe, [f"method={method}"]), spec).peak_bytes > 0


def test_every_lora_init_has_a_peft_value():
    from finetune.train.model import INIT

    assert set(INIT) == set(config.choices("lora.init"))
