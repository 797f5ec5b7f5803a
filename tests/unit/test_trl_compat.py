"""The private and experimental TRL names our stages rely on (finetune/train/trl_compat.py) still exist with the
shape we override or read: a TRL upgrade that moves one fails here, in seconds, instead of in a stage's e2e run."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from finetune.train import trl_compat

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("why", list(trl_compat.RELIED_ON))
def test_each_overridden_private_method_keeps_its_signature(why):
    owner, method, parameters = trl_compat.RELIED_ON[why]
    assert method in vars(owner), f"{owner.__name__}.{method} is gone ({why})"
    assert tuple(inspect.signature(getattr(owner, method)).parameters) == parameters, why


@pytest.mark.parametrize("why", list(trl_compat.ATTRIBUTES))
def test_each_attribute_read_is_still_set_by_the_trainer(why):
    owner, attribute = trl_compat.ATTRIBUTES[why]
    assert re.search(rf"self\.{attribute}\s*=", inspect.getsource(owner.__init__)), f"{owner.__name__}.{attribute}"


def test_each_overridden_method_is_still_called_by_its_trainer():
    """An override TRL no longer calls would silently stop taking effect."""
    for owner, method, _ in trl_compat.RELIED_ON.values():
        calls = re.compile(rf"\.{method}\b")  # called, or handed to `map`
        assert any(calls.search(inspect.getsource(member)) for _, member in inspect.getmembers(owner, inspect.isfunction)
                   if member.__name__ != method), f"{owner.__name__} never calls {method}"


def test_trl_is_imported_nowhere_else():
    """One place to look when TRL moves: every module that imports trl is trl_compat (or data packing's public
    pack_dataset)."""
    importers = set()
    for path in (REPO / "finetune").rglob("*.py"):
        if re.search(r"^\s*(from trl\b|import trl\b)", path.read_text(), re.M):
            importers.add(path.relative_to(REPO).as_posix())
    assert importers <= {"finetune/train/trl_compat.py", "finetune/data/pack.py"}, importers


def test_every_stage_is_declared_for_the_driver():
    from finetune import config, stages
    from finetune.train import stage_trainer
    from finetune.train.driver import StageTrainer

    for stage in config.choices("stage"):
        recipe = config.load(None, ["model=tiny_qwen2_5", f"stage={stage}",
                                    *(["train.micro_batch=2"] if stage == "kto" else [])])
        assert isinstance(stage_trainer(recipe), StageTrainer)
        assert stage in stages.STAGES


def test_the_fused_head_switch_is_where_we_patch_it():
    function, line = trl_compat.FUSED_HEAD_SWITCH
    assert line in inspect.getsource(function)
    import trl.trainer.utils as trl_utils

    assert callable(trl_utils._use_triton)


def test_projecting_only_trained_positions_gives_the_same_loss_and_gradients():
    """On CPU TRL's fused head projects every position unless patched; with the patch it projects only the labelled
    ones, and the loss and gradients are the same."""
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(0, 512, (2, 24))
    labels = ids.clone()
    labels[:, :15] = -100  # the prompt
    rows_seen = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        rows_seen.append(hidden.reshape(-1, hidden.shape[-1]).shape[0])
        return apply(hidden, *args)

    results = []
    for patched in (False, True):
        model.zero_grad()
        trl_utils._ChunkedLogProbFunction.apply = spy
        try:
            if patched:
                with trl_compat.loss_head_on_trained_positions_only():
                    loss = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
            else:
                loss = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        finally:
            trl_utils._ChunkedLogProbFunction.apply = apply
        loss.backward()
        results.append((loss.item(), model.lm_head.weight.grad.clone()))
    assert rows_seen == [2 * 23, 2 * 9]  # every shifted position, then only the 9 labelled ones per row
    assert abs(results[0][0] - results[1][0]) <= 1e-5 * abs(results[0][0])
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert trl_utils._use_triton(torch.device("cpu")) is False  # restored
