"""Every TRL name this package relies on beyond TRL's documented constructor arguments, in one place.

Our stages hand TRL token ids already rendered in each family's exact chat format (ChatGLM3, Baichuan2, Qwen-1 and
Llama-2 have no faithful HF chat template), so each trainer's own text-to-ids preparation is bypassed through a
private hook, and ORPO/CPO come from `trl.experimental` (TRL 1.x moved them there). Those hooks are not TRL's
public API: a TRL release may rename or reshape them. `RELIED_ON` lists each one with the parameters we override
or the attribute we read, and tests/unit/test_trl_compat.py checks them against the installed TRL — so an upgrade
fails one fast unit test here instead of six end-to-end stage runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import trl.trainer.utils as trl_utils
from datasets import Dataset
from transformers import Trainer
from trl import (DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RewardConfig,
                 RewardTrainer, SFTConfig, SFTTrainer)
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from finetune.data import kinds

RELIED_ON: dict[str, tuple[type, str, tuple[str, ...]]] = {
    "dpo skips its text preparation": (DPOTrainer, "_prepare_dataset",
                                       ("self", "dataset", "processing_class", "args", "dataset_name")),
    "kto builds its unpaired rows": (KTOTrainer, "_prepare_dataset",
                                     ("self", "dataset", "processing_class", "args", "dataset_name")),
    "orpo keeps our paired columns": (ORPOTrainer, "tokenize_row", ("self", "feature", "model")),
    "cpo/simpo keeps our paired columns": (CPOTrainer, "tokenize_row", ("self", "feature", "model")),
    "grpo takes prompt ids as they are": (GRPOTrainer, "_tokenize_prompts", ("self", "prompts")),
}
"""What we override: (TRL class, private method, its parameter names). The attributes read are in ATTRIBUTES."""

ATTRIBUTES: dict[str, tuple[type, str]] = {
    "sft's token count (train.logits=full)": (SFTTrainer, "_total_train_tokens"),
    "sft's logged metrics (train.logits=full)": (SFTTrainer, "_metrics"),
    "kto's KL switch": (KTOTrainer, "calculate_KL"),
}
"""Instance attributes a TRL trainer's __init__ sets and we read or update: (class, attribute)."""

FUSED_HEAD_SWITCH = (trl_utils.add_fused_lm_head, "compact = _use_triton(")
"""Where TRL's fused LM head decides to project only the labelled positions: `trl.trainer.utils._use_triton`, looked
up when the head runs (patched by `loss_head_on_trained_positions_only`)."""


@contextmanager
def loss_head_on_trained_positions_only() -> Iterator[None]:
    """While training: TRL's fused LM head projects through the vocabulary only the positions that have a label.

    TRL does so where Triton runs (CUDA, XPU); elsewhere it scores every position, prompt and padding included, and
    masks the result afterwards, so that tile shapes stay fixed for graph compilers (Neuron). Eager PyTorch on a CPU
    has no such constraint, and the head is a large share of the work there: Qwen2.5-0.5B's 151,936 × 896
    projection is over a quarter of its forward FLOPs, and a chat row's prompt is often half its tokens. The loss
    is the same sum over the same labelled positions either way."""
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer fed prompt_ids / chosen_ids / rejected_ids as they are: TRL's DPOTrainer re-tokenizes its dataset
    from text with the tokenizer's chat template in `_prepare_dataset`, while its collator consumes the
    pre-tokenized columns directly, so skipping that preparation is all it takes."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def unpaired(split: Dataset, seed: int) -> Dataset:
    """Each pair → (prompt, chosen, True) and (prompt, rejected, False), shuffled once with the run's seed: KTO
    samples sequentially (its KL estimate pairs neighbours), so the order must already mix prompts and labels."""
    def unpair(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "label": []}
        for prompt, chosen, rejected in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]):
            for completion, label in ((chosen, True), (rejected, False)):
                out["prompt_ids"].append(prompt)
                out["completion_ids"].append(completion)
                out["label"].append(label)
        return out

    rows = split.map(unpair, batched=True, remove_columns=split.column_names, desc="Unpairing")
    return rows.shuffle(seed=seed).flatten_indices()


def with_kl_completions(rows: Dataset, batch_size: int) -> Dataset:
    """KL_completion_ids: each batch's completions rotated by one (x_i, y_{i-1}), as TRL builds them: mismatched
    prompt/answer pairs whose log-ratio estimates the KL term."""
    def rotate(batch: dict[str, list]) -> dict[str, list]:
        return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

    return rows.map(rotate, batched=True, batch_size=batch_size, desc="KL completions")


class PretokenizedKTOTrainer(KTOTrainer):
    """KTOTrainer on exact-template ids. TRL's KTOTrainer would re-tokenize text with the tokenizer's chat template;
    its collator (DataCollatorForUnpairedPreference) needs only prompt_ids, completion_ids, label and, for the KL
    term, KL_completion_ids, so `_prepare_dataset` builds exactly those from paired preference rows."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        rows = unpaired(dataset, args.seed) if kinds.of(dataset.column_names) == "paired" else dataset
        return with_kl_completions(rows, args.per_device_train_batch_size) if self.calculate_KL else rows


class PretokenizedORPOTrainer(ORPOTrainer):
    """ORPOTrainer fed the columns its `tokenize_row` would produce (stages' paired_row): its dataset preparation
    is three `map`s that leave such rows untouched once `tokenize_row` is the identity."""

    def tokenize_row(self, feature, model=None) -> dict:
        return {}


class PretokenizedCPOTrainer(CPOTrainer):
    """CPOTrainer (stage=simpo) fed exact-template paired columns, as PretokenizedORPOTrainer."""

    def tokenize_row(self, feature, model=None) -> dict:
        return {}


class PretokenizedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose `prompt` column already holds token ids: TRL renders prompts with the tokenizer's chat
    template in `_tokenize_prompts`; here they pass through (no images, no multimodal fields)."""

    def _tokenize_prompts(self, prompts: list):
        return [list(ids) for ids in prompts], None, {}


class FullLogitsSFTTrainer(SFTTrainer):
    """train.logits=full: the loss as transformers' Trainer computes it, the model's own ForCausalLMLoss over the
    materialized [tokens, vocab] logits upcast to fp32 — the stack most scripts run, so a user can reproduce (or
    compare) their memory. TRL's fused head, which never builds those logits, is the default; its entropy and token
    accuracy metrics are not logged here, since they come from that head."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        if model.training:
            self._count_tokens(inputs)
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _count_tokens(self, inputs: dict[str, Any]) -> None:
        """The `num_tokens` TRL's own loss logs (the run summary's throughput): unmasked tokens, or whole packed
        rows."""
        mask = inputs.get("attention_mask")
        local = mask.sum() if mask is not None else torch.tensor(inputs["position_ids"].numel())
        self._total_train_tokens += self.accelerator.gather_for_metrics(local.to(self.args.device)).sum().item()
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]


__all__ = ["CPOConfig", "DPOConfig", "GRPOConfig", "KTOConfig", "ORPOConfig", "RewardConfig", "RewardTrainer",
           "SFTConfig", "SFTTrainer", "FullLogitsSFTTrainer", "PretokenizedCPOTrainer", "PretokenizedDPOTrainer",
           "PretokenizedGRPOTrainer", "PretokenizedKTOTrainer", "PretokenizedORPOTrainer", "RELIED_ON", "ATTRIBUTES",
           "FUSED_HEAD_SWITCH", "loss_head_on_trained_positions_only"]
