"""Packing: every example survives whole, positions restart per example, no token sees or predicts across an
example boundary (checked on a real tiny model through TRL's padding-free collator), padding waste drops below 5%."""

import json
import random

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import (AutoTokenizer, GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finetune import config
from finetune.data import build
from finetune.data.pack import pack, padding_waste
from finetune.models.tokenizers import bundled_tokenizer_dir


def examples(lengths: list[int], seed: int = 0) -> Dataset:
    """Rows shaped like rendered chat: a prompt (-100) then a trained answer; token ids in 3..63."""
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        ids = [rng.randrange(3, 64) for _ in range(n)]
        prompt = max(1, n // 3)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "attention_mask": [1] * n})
    return Dataset.from_list(rows)


def unpack(row: dict) -> list[tuple[list[int], list[int], list[int]]]:
    out, start = [], 0
    for n in row["seq_lengths"]:
        out.append(tuple(row[k][start:start + n] for k in ("input_ids", "labels", "position_ids")))
        start += n
    return out


def test_packed_rows_hold_every_example_whole_with_positions_restarting():
    source = examples([5, 9, 3, 12, 7, 2, 16, 4])
    packed = pack(source, max_length=16)
    assert len(packed) < len(source)
    pieces = [piece for row in packed for piece in unpack(row)]
    assert all(len(row["input_ids"]) <= 16 for row in packed)
    assert sorted(p[0] for p in pieces) == sorted(source["input_ids"])
    by_ids = {tuple(r["input_ids"]): r["labels"] for r in source}
    for ids, labels, positions in pieces:
        assert positions == list(range(len(ids)))
        assert labels == by_ids[tuple(ids)]  # first label is -100 already: nothing else changes


def test_first_label_of_each_packed_example_is_never_trained():
    source = Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    row = pack(source, max_length=8)[0]
    assert [labels[0] for _, labels, _ in unpack(row)] == [-100, -100]
    assert sorted(labels[1:] for _, labels, _ in unpack(row)) == [[6, 7], [9]]


def test_trl_padding_free_collator_rebuilds_our_positions_and_keeps_our_labels():
    packed = pack(examples([6, 4, 3, 9, 5]), max_length=10)
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([packed[0], packed[1]])
    assert batch["position_ids"][0].tolist() == packed[0]["position_ids"] + packed[1]["position_ids"]
    assert batch["labels"][0].tolist() == packed[0]["labels"] + packed[1]["labels"]
    assert "attention_mask" not in batch


ARCHITECTURES = {  # the native classes our families train as (ChatGLM3 → Glm, Qwen → Qwen2, Llama-2/Baichuan2-7B)
    "llama-sdpa": (LlamaConfig, LlamaForCausalLM, "sdpa"), "llama-eager": (LlamaConfig, LlamaForCausalLM, "eager"),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, "sdpa"), "glm": (GlmConfig, GlmForCausalLM, "sdpa"),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_no_cross_contamination_in_a_real_model(arch):
    config_class, model_class, attn = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     max_position_embeddings=64, pad_token_id=0, attn_implementation=attn)).eval()
    source = examples([7, 11, 5, 9, 6], seed=1)
    packed = pack(source, max_length=24)
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(list(packed))
    with torch.no_grad():
        packed_out = model(**batch, use_cache=False)
        flat = batch["input_ids"][0].tolist()
        losses, count = 0.0, 0
        for row in source:  # each example alone, unpacked, as in an ordinary padded batch of one
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            alone = model(input_ids=ids, labels=labels, use_cache=False)
            start = next(i for i in range(len(flat)) if flat[i:i + len(row["input_ids"])] == row["input_ids"])
            assert torch.allclose(packed_out.logits[0, start:start + ids.shape[1]], alone.logits[0], atol=1e-5)
            n = int((labels[0, 1:] != -100).sum())
            losses, count = losses + alone.loss.item() * n, count + n
    assert packed_out.loss.item() == pytest.approx(losses / count, rel=1e-5)


def test_packing_cuts_padding_waste_below_five_percent_on_a_realistic_mix():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=5.5, sigma=0.8, size=3000), 24, 2048).astype(int).tolist()
    source = Dataset.from_list([{"input_ids": [1] * n, "labels": [1] * n} for n in lengths])
    packed_lengths = [sum(row) for row in pack(source, max_length=2048)["seq_lengths"]]
    assert sum(packed_lengths) == sum(lengths)
    assert padding_waste(lengths, micro_batch=8) > 0.3
    assert padding_waste(packed_lengths, micro_batch=8) < 0.05


def test_padding_waste_counts_pads_per_micro_batch():
    assert padding_waste([4, 2, 3, 3], micro_batch=2) == pytest.approx(1 - 12 / 14)
    assert padding_waste([5, 1], micro_batch=1) == 0


def test_build_with_packing_gives_the_columns_a_padding_free_trainer_reads(tmp_path, monkeypatch):
    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir("llama2"))  # from the shared cache
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"Fact {i}: {i} + {i} = {2 * i}."}) + "\n" for i in range(40)))
    recipe = config.load(None, ["model=tiny_llama2", f"data.path={path}", "data.packing=true",
                                "train.max_length=128"])
    train = build(recipe, tok, "llama2")["train"]
    assert set(train.column_names) == {"input_ids", "labels", "position_ids", "seq_lengths"}
    assert sum(map(len, train["seq_lengths"])) == 40 and len(train) < 40


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_padding_free_micro_batch_gives_the_padded_batch_loss(arch):
    """Unpacked rows, as SFT trains every micro-batch of two or more (finetune.train.sft.padding_free): laid end to
    end, they give the loss of the padded batch without computing the padding."""
    config_class, model_class, attn = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     max_position_embeddings=64, pad_token_id=0, attn_implementation=attn)).eval()
    rows = list(examples([7, 15, 4], seed=2))
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    assert flat["input_ids"].shape == (1, 26) and padded["input_ids"].shape == (3, 15)
    with torch.no_grad():
        assert model(**flat, use_cache=False).loss.item() == pytest.approx(
            model(**padded, use_cache=False).loss.item(), rel=1e-5)
