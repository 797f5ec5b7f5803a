"""model=file.gguf: what a GGUF's metadata says it is, read before any tensor is (GGUF files written here with the
gguf package's own writer: metadata exactly as llama.cpp writes it, tensors tiny)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from gguf import GGUFWriter, LlamaFileType

from finetune.errors import UserError
from finetune.models import gguf_base, registry


def write_gguf(path: Path, arch: str, *, hidden: int, layers: int, vocab: int, name: str = "Test model",
               output_tensor: bool = False, eos: Optional[int] = None, tokens: Optional[list[str]] = None) -> Path:
    writer = GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_token_list(tokens or [f"t{i}" for i in range(vocab)])
    if eos is not None:
        writer.add_eos_token_id(eos)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    if output_tensor:
        writer.add_tensor("output.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gguf_base.read.cache_clear()
    return path


QWEN_0_5B = dict(hidden=896, layers=24, vocab=151936)


def test_qwen2_gguf_is_the_registry_model_its_name_and_shape_say(tmp_path):
    base = gguf_base.read(write_gguf(tmp_path / "m.gguf", "qwen2", name="Qwen2.5 Coder 0.5B Instruct", **QWEN_0_5B))
    assert (base.spec.name, base.spec.variant.name, base.spec.family.name) == ("qwen2_5_0_5b", "coder_instruct",
                                                                             "qwen2_5")
    assert base.file_type == "Q4_K_M"
    assert base.spec.original_config["tie_word_embeddings"] is True  # no output.weight: tied, as published
    assert "Q4_K_M" in base.note and "rounding error" in base.note


def test_separate_output_tensor_unties_the_embeddings(tmp_path):
    base = gguf_base.read(write_gguf(tmp_path / "m.gguf", "qwen2", name="Qwen2.5 0.5B Instruct", output_tensor=True,
                                     **QWEN_0_5B))
    assert base.spec.variant.name == "instruct"
    assert base.spec.original_config["tie_word_embeddings"] is False


def test_an_architecture_without_a_family_is_one_error_naming_it(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", "phi3", hidden=3072, layers=32, vocab=100)
    with pytest.raises(UserError, match=r"architecture 'phi3'.*qwen2 \(Qwen2.5\).*llama \(Llama-2, 32,000-token"):
        gguf_base.read(path)


def test_a_llama_gguf_without_llama2s_vocabulary_is_refused(tmp_path):
    path = write_gguf(tmp_path / "llama3.gguf", "llama", hidden=4096, layers=32, vocab=32064)
    with pytest.raises(UserError, match="'llama' with a 32,064-token vocabulary"):
        gguf_base.read(path)


def test_a_size_the_registry_lacks_names_the_sizes_it_has(tmp_path):
    path = write_gguf(tmp_path / "q14b.gguf", "qwen2", hidden=5120, layers=48, vocab=151936)
    with pytest.raises(UserError, match=r"hidden size 5120 and 48 layers.*0.5B \(896, 24\)"):
        gguf_base.read(path)


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    from finetune.models.tokenizers import bundled_tokenizer_dir

    return AutoTokenizer.from_pretrained(bundled_tokenizer_dir("qwen2_5"))


def qwen_gguf_tokens(tokenizer) -> list[str]:
    """The vocabulary llama.cpp's converter writes for Qwen2.5: the tokenizer's tokens, padded to the embedding's
    151,936 rows."""
    ours = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return ours + [f"[PAD{i}]" for i in range(len(ours), QWEN_0_5B["vocab"])]


def qwen_base(path: Path, tokens: list[str], eos: int) -> gguf_base.GGUFBase:
    """A Qwen2.5-0.5B GGUF with this vocabulary, as read() would describe it (reading it twice costs seconds: a
    151,936-token array is parsed string by string)."""
    write_gguf(path, "qwen2", tokens=tokens, eos=eos, **QWEN_0_5B)
    return gguf_base.GGUFBase(path, "qwen2", "Q4_K_M", "Qwen2.5 0.5B Instruct", registry.spec("qwen2_5_0_5b"))


def test_the_familys_tokenizer_must_be_the_ggufs_token_for_token(tmp_path, qwen_tokenizer):
    tokens = qwen_gguf_tokens(qwen_tokenizer)
    im_end = tokens.index("<|im_end|>")
    gguf_base.check_tokenizer(qwen_base(tmp_path / "same.gguf", tokens, im_end), qwen_tokenizer)  # passes
    tokens[1000], tokens[1001] = tokens[1001], tokens[1000]  # another vocabulary: the same ids, other tokens
    with pytest.raises(UserError, match=r"other.gguf: its vocabulary differs from Qwen2.5's at 2 ids \(first: id 1000 "
                                        r"is 'Th' in the GGUF, 'atus' in Qwen2.5's tokenizer\)"):
        gguf_base.check_tokenizer(qwen_base(tmp_path / "other.gguf", tokens, im_end), qwen_tokenizer)


def test_a_gguf_ending_turns_with_a_token_the_format_never_emits_is_refused(tmp_path, qwen_tokenizer):
    base = qwen_base(tmp_path / "m.gguf", qwen_gguf_tokens(qwen_tokenizer), eos=0)
    with pytest.raises(UserError, match=r"ends a turn with '!', which Qwen2.5's chat format never emits"):
        gguf_base.check_tokenizer(base, qwen_tokenizer)


def test_an_ollama_blob_without_suffix_is_found_by_its_magic(tmp_path):
    blob = write_gguf(tmp_path / "sha256-1d96", "qwen2", **QWEN_0_5B)
    assert gguf_base.is_gguf(str(blob))
    assert not gguf_base.is_gguf(str(tmp_path))  # a directory is a checkpoint, not a GGUF
    (tmp_path / "notes.txt").write_text("hello")
    assert not gguf_base.is_gguf(str(tmp_path / "notes.txt"))


def test_a_missing_or_broken_file_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such GGUF file"):
        gguf_base.read(tmp_path / "absent.gguf")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 7)
    with pytest.raises(UserError, match="not a readable GGUF file"):
        gguf_base.read(tmp_path / "broken.gguf")


def test_the_estimate_plans_a_gguf_from_its_metadata(tmp_path, cli):
    path = write_gguf(tmp_path / "m.gguf", "qwen2", name="Qwen2.5 Coder 0.5B Instruct", output_tensor=True,
                      **QWEN_0_5B)
    done = cli("estimate", "recipe=qwen2_5_0_5b_lora", f"model={path}", "gpu_mem=24", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == "qwen2_5_0_5b" and report["variant"] == "coder_instruct"
    assert "dequantized from Q4_K_M" in report["base_note"]
    # untied: the output layer's 896 x 151,936 weights count on top of the published (tied) 494,032,768
    assert report["params_total"] == 494_032_768 + 896 * 151_936
