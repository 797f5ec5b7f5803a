"""What each training stage is, without its trainer: the data it reads, the keys it reads, the rules a recipe must
keep for it, and what it adds to memory — everything the dry run, `finetune estimate`, the web form and training
must agree on, importable in milliseconds (no torch, no TRL).

The trainer half of each stage (its TRL trainer and config, how its rows are shaped) is finetune/train/<stage>.py,
which refers back to its entry here; finetune/config.py runs `check` on every recipe it loads, so a recipe that
training would refuse is refused by the dry run and the page first, with the same message.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from finetune.schema import Recipe, Stage, trains_weights

if TYPE_CHECKING:
    from finetune.data.kinds import Kind  # finetune.data imports `datasets`: too slow for every recipe load

Rule = Callable[[Recipe], Optional[str]]
"""A check: the problem with the recipe, in one line naming the keys to change, or None."""

STAGE_SECTIONS = ("dpo", "pref", "reward", "grpo")
"""Recipe sections read by some stages only: a value set there for a stage that does not read it is an error."""

BUILT_IN_REWARDS = ("exact_match", "format", "length")


@dataclass(frozen=True)
class StageInfo:
    name: Stage
    data: tuple[Kind, ...]  # the kinds of data it trains on (finetune.data.kinds)
    sequences: int  # sequences through the model per example (chosen + rejected: 2)
    reads: tuple[str, ...] = ()  # keys under STAGE_SECTIONS this stage reads ("dpo" means the whole section)
    rules: tuple[Rule, ...] = ()
    reference: Callable[[Recipe], bool] = lambda recipe: False  # keeps a reference policy
    samples: bool = True  # generates before/after answers for the report (a reward model does not generate)

    def reads_key(self, key: str) -> bool:
        return any(key == read or key.startswith(f"{read}.") for read in self.reads)


def _kto_pairs_within_a_micro_batch(recipe: Recipe) -> Optional[str]:
    if recipe.train.micro_batch < 2:
        return ("stage=kto needs train.micro_batch >= 2: its KL term pairs each answer with another prompt of the "
                "same micro-batch")
    return None


def _grpo_groups_fill_the_batch(recipe: Recipe) -> Optional[str]:
    batch, group = recipe.train.micro_batch * recipe.train.grad_accum, recipe.grpo.num_generations
    if batch % group:
        return (f"stage=grpo: train.micro_batch × train.grad_accum ({recipe.train.micro_batch} × "
                f"{recipe.train.grad_accum}) must be a multiple of grpo.num_generations={group}: each prompt's "
                f"answers are scored as one group")
    return None


def _grpo_prompts_are_whole(recipe: Recipe) -> Optional[str]:
    return "stage=grpo samples answers to whole prompts: set data.packing=false" if recipe.data.packing else None


def _grpo_rewards_are_named(recipe: Recipe) -> Optional[str]:
    """The names only: a `module:function` is imported when training starts, never by a dry run or the page."""
    names = [n.strip() for n in recipe.reward.fn.split(",") if n.strip()]
    if not names:
        return "reward.fn is empty: name at least one reward function (exact_match, format, length or module:function)"
    for name in names:
        if name not in BUILT_IN_REWARDS and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name):
            return f"reward.fn={name}: give a built-in ({', '.join(BUILT_IN_REWARDS)}) or module:function"
    return None


STAGES: dict[Stage, StageInfo] = {info.name: info for info in (
    StageInfo("sft", ("conversations",), 1),
    StageInfo("dpo", ("paired",), 2, reads=("dpo",), reference=lambda recipe: True),
    StageInfo("kto", ("paired", "unpaired"), 2, reads=("pref.beta", "pref.desirable_weight", "pref.undesirable_weight"),
              rules=(_kto_pairs_within_a_micro_batch,), reference=lambda recipe: True),
    StageInfo("orpo", ("paired",), 2, reads=("pref.beta",)),
    StageInfo("simpo", ("paired",), 2, reads=("pref.beta", "pref.simpo_gamma")),
    StageInfo("rm", ("paired",), 2, samples=False),
    StageInfo("grpo", ("conversations",), 1, reads=("grpo", "reward"),
              rules=(_grpo_groups_fill_the_batch, _grpo_prompts_are_whole, _grpo_rewards_are_named),
              reference=lambda recipe: recipe.grpo.beta > 0),
)}


def keeps_reference_copy(recipe: Recipe) -> bool:
    """Whether TRL keeps a second, frozen copy of the weights as the reference policy: only when the stage keeps a
    reference and the method trains the weights themselves (LoRA's reference is the base with the adapter off)."""
    return bool(STAGES[recipe.stage].reference(recipe)) and trains_weights(recipe.method)


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}.{f.name}"
        out.update(_leaves(value, key) if dataclasses.is_dataclass(value) else {key: value})
    return out


def _unread_keys(recipe: Recipe) -> Optional[str]:
    """A stage key set for another stage would be silently ignored (`stage=dpo pref.beta=0.3` trains with
    dpo.beta): name it, the key this stage reads instead, and the stages that read it."""
    info, defaults = STAGES[recipe.stage], Recipe()
    given = {k: v for section in STAGE_SECTIONS for k, v in _leaves(getattr(recipe, section), section).items()}
    default = {k: v for section in STAGE_SECTIONS for k, v in _leaves(getattr(defaults, section), section).items()}
    for key, value in given.items():
        if value == default[key] or info.reads_key(key):
            continue
        readers = "/".join(name for name, other in STAGES.items() if other.reads_key(key))
        same = [k for k in given if k.split(".")[-1] == key.split(".")[-1] and info.reads_key(k)]
        instead = f"; stage={recipe.stage} reads {same[0]}" if same else ""
        return (f"{key}={value} is not read by stage={recipe.stage}{instead} ({key} is for stage={readers}); "
                f"remove it or change the stage")
    return None


def problems(recipe: Recipe) -> list[str]:
    """Every rule of the recipe's stage that the recipe breaks, in declaration order."""
    found = [rule(recipe) for rule in (_unread_keys, *STAGES[recipe.stage].rules)]
    return [problem for problem in found if problem]
