"""GRPO's reward functions, named in the recipe (`reward.fn=exact_match,format` or `reward.fn=my_pkg.rewards:score`).

Each is called as TRL calls reward functions: `fn(prompts=..., completions=[text, ...], completion_ids=[[id, ...]],
answer=[reference text, ...], **more) -> list[float]`, one score per sampled answer. `answer` is the reference
answer of the data row (the conversation's last assistant turn).
    exact_match  1 when the answer equals the reference (whitespace-trimmed), else 0
    format       1 when the whole answer matches reward.pattern (a regex), else 0
    length       1 at reward.target_length tokens, falling linearly to 0 at twice (or zero times) that length
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from finetune.config import Recipe
from finetune.errors import UserError

RewardFn = Callable[..., list[float]]


def exact_match(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answer)]


def format_reward(pattern: str) -> RewardFn:
    regex = re.compile(pattern, re.DOTALL)

    def format(completions: list[str], **_: Any) -> list[float]:  # TRL logs each reward under its __name__
        return [float(regex.fullmatch(c.strip()) is not None) for c in completions]

    return format


def length_reward(target: int) -> RewardFn:
    def length(completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [max(0.0, 1.0 - abs(len(ids) - target) / target) for ids in completion_ids]

    return length


def user_function(name: str) -> RewardFn:
    """`module:function`, imported; any failure is one line naming reward.fn."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise UserError(f"reward.fn={name}: give a built-in (exact_match, format, length) or module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise UserError(f"reward.fn={name}: cannot import {module_name} ({exc}); is it on PYTHONPATH?") from None
    except AttributeError:
        raise UserError(f"reward.fn={name}: module {module_name} has no function {attr}") from None
    if not callable(fn):
        raise UserError(f"reward.fn={name}: {attr} is not a function")
    return fn


def reward_functions(recipe: Recipe) -> list[RewardFn]:
    """The recipe's reward functions, in order (TRL sums their scores)."""
    built_in: dict[str, Callable[[], RewardFn]] = {
        "exact_match": lambda: exact_match, "format": lambda: format_reward(recipe.reward.pattern),
        "length": lambda: length_reward(recipe.reward.target_length)}
    names = [n.strip() for n in recipe.reward.fn.split(",") if n.strip()]  # at least one: finetune.stages checks
    return [built_in[n]() if n in built_in else user_function(n) for n in names]
