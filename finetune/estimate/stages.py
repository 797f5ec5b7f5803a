"""What each training stage adds to the memory of one step, on top of the SFT model in memory.py.

    sft     one sequence per example
    dpo     chosen + rejected (2 sequences); method=full/freeze: TRL's frozen reference copy of the weights
            (LoRA/QLoRA: the reference is the base with the adapter disabled, no copy)
    kto     the answer + its KL sequence (a mismatched answer, 2 sequences); reference as for dpo
    orpo    chosen + rejected; no reference model
    simpo   chosen + rejected; no reference model
    rm      chosen + rejected through the decoder; a value head (hidden × 1) instead of the LM loss over the vocabulary
    grpo    generation: grpo.num_generations answers of up to grpo.max_completion_length tokens after a
            train.max_length prompt, decoded with a KV cache, and one [answers, vocab] fp32 logits row per step; the
            policy step then scores micro_batch prompt+answer sequences; with grpo.beta > 0 a reference model (a copy
            for full/freeze, the disabled adapter otherwise)
The dry-run names these (`stage_terms` in its JSON, a line under the table).
"""

from __future__ import annotations

from finetune import stages
from finetune.config import Recipe
from finetune.estimate.params import ModelFacts


def sequences(recipe: Recipe) -> int:
    """Sequences through the model per micro-batch."""
    return recipe.train.micro_batch * stages.STAGES[recipe.stage].sequences


def tokens(recipe: Recipe) -> int:
    """Tokens per sequence at most: GRPO's sequences are a prompt plus a sampled answer."""
    extra = recipe.grpo.max_completion_length if recipe.stage == "grpo" else 0
    return recipe.train.max_length + extra


def generation_bytes(recipe: Recipe, f: ModelFacts, weight_bytes: int) -> int:
    """GRPO's sampling buffers: the KV cache of every answer of a group at full length, and the fp32 logits of the
    step being decoded."""
    if recipe.stage != "grpo":
        return 0
    answers, length = recipe.grpo.num_generations, tokens(recipe)
    kv_cache = answers * length * f.layers * 2 * f.kv_heads * f.head_dim * weight_bytes
    return kv_cache + answers * f.vocab * 4


def stage_terms(recipe: Recipe, f: ModelFacts, weight_bytes: int) -> dict[str, int]:
    """The stage's own figures, for the dry-run: what it adds and why."""
    terms = {"sequences_per_micro_batch": sequences(recipe)}
    if stages.keeps_reference_copy(recipe):
        terms["reference_copy_bytes"] = f.params_total * weight_bytes
    if recipe.stage == "rm":
        terms["value_head_params"] = f.hidden
    if recipe.stage == "grpo":
        terms["generation_bytes"] = generation_bytes(recipe, f, weight_bytes)
    return terms
