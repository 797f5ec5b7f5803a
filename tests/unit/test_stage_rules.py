"""Every rule a recipe can break is checked when it loads, so the dry run, `finetune estimate`, the web form and
training refuse the same recipes with the same line — and no stage key is silently ignored."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finetune import config, stages
from finetune.errors import UserError
from finetune.web import forms

BROKEN = {
    "dpo reads dpo.beta": (["stage=dpo", "pref.beta=0.3"],
                           "pref.beta=0.3 is not read by stage=dpo; stage=dpo reads dpo.beta"),
    "kto reads pref.beta": (["stage=kto", "train.micro_batch=2", "dpo.beta=0.2"],
                            "dpo.beta=0.2 is not read by stage=kto; stage=kto reads pref.beta"),
    "grpo keys on sft": (["grpo.num_generations=8"], "grpo.num_generations=8 is not read by stage=sft"),
    "kto pairs within a micro-batch": (["stage=kto", "train.micro_batch=1"], "stage=kto needs train.micro_batch >= 2"),
    "grpo groups fill the batch": (["stage=grpo", "train.micro_batch=1", "train.grad_accum=3"],
                                   "must be a multiple of grpo.num_generations=4"),
    "grpo prompts are whole": (["stage=grpo", "data.packing=true"], "set data.packing=false"),
    "grpo rewards are named": (["stage=grpo", "reward.fn=exact match"], "reward.fn=exact match: give a built-in"),
    "lora+ needs adapters": (["method=full", "lora.plus_ratio=16"], "lora.plus_ratio is for method=lora/qlora"),
    "full logits are sft's": (["stage=dpo", "train.logits=full"], "train.logits=full is for stage=sft"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_loading_refuses_and_the_page_says_the_same(case):
    overrides, message = BROKEN[case]
    with pytest.raises(UserError, match=message.replace("+", r"\+").replace(".", r"\.")):
        config.load(None, ["model=tiny_qwen2_5", *overrides])
    if any(o.startswith("reward.fn=") for o in overrides):
        return  # the page refuses reward.fn itself: it names code to run
    view = forms.estimate(None, {"model": "tiny_qwen2_5"}, " ".join(overrides))
    assert view.error is not None and message in view.error, view.error


@pytest.mark.parametrize("command", [["--dry-run"], ["estimate"]])
def test_the_dry_run_and_estimate_refuse_with_the_same_line(command):
    overrides, message = BROKEN["dpo reads dpo.beta"]
    args = [*command, "model=tiny_qwen2_5", *overrides] if command == ["estimate"] else \
        ["model=tiny_qwen2_5", *overrides, *command]
    done = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_stage_key_at_its_default_is_not_an_error():
    """Recipes that spell out a default (a page sending every field) still load for every stage."""
    for stage in stages.STAGES:
        config.load(None, ["model=tiny_qwen2_5", f"stage={stage}", "train.micro_batch=2", "pref.simpo_gamma=0.5",
                           "dpo.beta=0.1", "grpo.num_generations=4"])


def test_every_shipped_recipe_keeps_its_stage_rules():
    for name in config.shipped_recipes():
        recipe = config.load(name)
        assert stages.problems(recipe) == [], name
