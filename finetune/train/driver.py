"""The one training loop every stage runs: session → tokenizer → data → rows → TRL config → model → trainer →
finish. A stage is a `StageTrainer` declaration in finetune/train/<stage>.py (its TRL trainer and config, the
columns its trainer reads, its config keys) plus its entry in finetune/stages.py (its data, its rules, its memory
terms); nothing here depends on which stage runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from accelerate import PartialState
from datasets import DatasetDict
from peft import LoraConfig
from transformers import AutoTokenizer

from finetune import data, stages
from finetune.config import Recipe
from finetune.rundir import RunDir
from finetune.train import session as lifecycle
from finetune.train import trl_compat
from finetune.train.model import load_model, lora_config
from finetune.train.session import Session


def base_with_new_adapter(session: Session) -> tuple[torch.nn.Module, Optional[LoraConfig]]:
    """The base as the method trains it, and the fresh adapter TRL attaches (None for full/freeze)."""
    return load_model(session), lora_config(session.recipe, session.spec)


def _as_is(splits: DatasetDict, tokenizer: Any, recipe: Recipe) -> DatasetDict:
    return splits


def _nothing(*_: Any) -> dict[str, Any]:
    return {}


def _untouched(model: torch.nn.Module, tokenizer: Any, session: Session) -> None:
    return None


@dataclass(frozen=True)
class StageTrainer:
    """The trainer half of a stage, declared top to bottom like TRL's <Stage>Trainer / <Stage>Config."""

    trainer: type | Callable[[Recipe], type]  # a TRL trainer (trl_compat), or the one a recipe key picks
    config: type  # its TRL config class
    options: Callable[[Recipe, DatasetDict], dict[str, Any]]  # the config's stage keys (beta, max_length, ...)
    rows: Callable[[DatasetDict, Any, Recipe], DatasetDict] = _as_is  # our rows → the columns its trainer reads
    model: Callable[[Session], tuple[torch.nn.Module, Optional[LoraConfig]]] = base_with_new_adapter
    ready: Callable[[Recipe], dict[str, Any]] = _nothing  # found before any weight is read; → more trainer kwargs
    tune: Callable[[torch.nn.Module, Any, Session], None] = _untouched  # the model or tokenizer set for the stage


def run(recipe: Recipe, stage: StageTrainer, *, force: bool, trust_remote_code: bool) -> RunDir:
    """Train one stage of `recipe`; every refusal (memory, data, an SFT run that does not fit) comes before the
    first step, and a new run that fails before it leaves no directory behind (lifecycle.discarded_on_failure)."""
    info = stages.STAGES[recipe.stage]
    extra = stage.ready(recipe)
    session = lifecycle.start(recipe, force=force, trust_remote_code=trust_remote_code)
    with lifecycle.discarded_on_failure(session):
        tokenizer = AutoTokenizer.from_pretrained(session.model.path, trust_remote_code=session.trust_remote_code)
        with PartialState().local_main_process_first():  # rank 0 tokenizes, the others read the datasets cache
            splits = processor(info)(recipe, tokenizer, session.template)
            rows = stage.rows(splits, tokenizer, recipe)
        args = lifecycle.trainer_args(stage.config, session, has_eval="eval" in rows, **stage.options(recipe, rows))
        model, adapter = stage.model(session)
        stage.tune(model, tokenizer, session)
        samples = lifecycle.before_samples(session, model, tokenizer, splits) if info.samples else []
        trainer_class = stage.trainer if isinstance(stage.trainer, type) else stage.trainer(recipe)
        trainer = trainer_class(model=model, args=args, train_dataset=rows["train"], eval_dataset=rows.get("eval"),
                                processing_class=tokenizer, peft_config=adapter, **extra)
    with trl_compat.loss_head_on_trained_positions_only():
        return lifecycle.finish(session, trainer, samples)


def processor(info: stages.StageInfo) -> Callable[[Recipe, Any, str], DatasetDict]:
    """The data processor for the kinds of data a stage trains on (finetune.data): conversations → ids and labels,
    paired or unpaired preference → prompt and answer ids."""
    return data.build if info.data == ("conversations",) else data.build_preference
