"""Our fast tokenizers give the ORIGINAL ids (exact token ids are the contract: training, inference and exports).

The references are the originals' own encoders, used directly: SentencePiece on tokenizer.model, tiktoken with
Qwen's regex on qwen.tiktoken (NFC first, as Qwen-1's tokenize() does). Qwen2.5's tokenizer.json is checked
against tiktoken too: its regular ids are Qwen-1's ranks.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import unicodedata
from functools import cache

import pytest
import sentencepiece as spm
import tiktoken

from finetune.errors import UserError
from finetune.models import tokenizers

FIX = tokenizers.BUNDLED
FAMILIES = ("chatglm3", "baichuan2", "qwen1", "qwen2_5", "llama2")
SPM = ("chatglm3", "baichuan2", "llama2")

QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
            r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN1_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
             **{f"<|extra_{i}|>": 151646 + i for i in range(205)}}
QWEN2_5_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                   "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                   "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN2_5_ADDED = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>")
QWEN2_5_IDS = {t: 151643 + i for i, t in enumerate(QWEN2_5_SPECIAL + QWEN2_5_ADDED)}
CHATGLM3_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792,
                "eop": 64793, "<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796,
                "<|observation|>": 64797}
PUBLISHED = {  # special-token ids, len(tokenizer), (bos, eos, pad, unk) ids as the originals set them
    "chatglm3": (CHATGLM3_IDS, 64798, (None, 2, 0, 0)),
    "baichuan2": ({"<unk>": 0, "<s>": 1, "</s>": 2, "<reserved_106>": 195, "<reserved_107>": 196}, 125696,
                  (1, 2, 0, 0)),
    "qwen1": (QWEN1_IDS, 151851, (None, 151643, 151643, None)),
    "qwen2_5": (QWEN2_5_IDS, 151665, (None, 151645, 151643, None)),
    "llama2": ({"<unk>": 0, "<s>": 1, "</s>": 2}, 32000, (1, 2, None, 0)),
}
# Special strings that `tok.encode` parses as tokens; `split_special_tokens=True` leaves them as text.
PARSED = {"chatglm3": tuple(CHATGLM3_IDS), "baichuan2": ("<unk>", "<s>", "</s>"), "qwen1": tuple(QWEN1_IDS),
          "qwen2_5": QWEN2_5_SPECIAL, "llama2": ("<unk>", "<s>", "</s>")}

CORPUS = [
    "Hello, world!", "  two leading spaces", "trailing spaces   ", "multiple   spaces  inside", " ", "   ", "a",
    "\n", "\n\nline\nbreaks\n\n", "\ttabs\tand\t\ttabs", "\r\n windows \r line", "\u3000全角空格\u3000",
    "digits 0123456789 3.14159 1,000,000 2024-01-01", "你好，世界！今天天气怎么样？", "中英混合 mixed text 123 测试。",
    "emoji 🙂👍🏽🇨🇳 and ZWJ 👩‍💻", "rare: ᚠᛇᚻ 𝔘𝔫𝔦 ꙮ กิ ﷺ", "byte fallback: \x00\x07\x1b \ue000 \U0010fffd",
    "NFC: e\u0301 vs é, ﬁ, Ａ１", "code: def f(x):\n    return x**2  # comment\n", "<html><body>tag</body></html>",
    "'s 're 've it's WE'LL", "people isopropyl sopa geopolitics", "[INST] <<SYS>>\nsys\n<</SYS>>\n\nq [/INST]",
    "<reserved_106>问<reserved_107>答", "1+1=2... 。。。 ```py``` <!-- c --> ‼ ㊣",
]


@cache
def sp(family: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(FIX / family / "tokenizer.model"))


@cache
def tiktoken_encoding(family: str) -> tiktoken.Encoding:
    ranks = {base64.b64decode(t): int(r) for t, r in (
        line.split() for line in (FIX / "qwen1" / "qwen.tiktoken").read_bytes().splitlines() if line)}
    specials = QWEN1_IDS if family == "qwen1" else QWEN2_5_IDS
    return tiktoken.Encoding(family, pat_str=QWEN_PAT, mergeable_ranks=ranks, special_tokens=specials)


def original_plain(family: str, text: str) -> list[int]:
    """The original encoder with no special-token parsing (what the official chat code does to contents)."""
    if family in SPM:
        return sp(family).encode(text)
    return tiktoken_encoding(family).encode(unicodedata.normalize("NFC", text), allowed_special=set(),
                                            disallowed_special=())


def original_parsed(family: str, text: str) -> list[int]:
    """Special strings as tokens: Qwen's tokenize(allowed_special="all"); for SentencePiece the legacy slow
    tokenizer / llama.cpp rule: each fragment between special tokens encoded alone, with its own dummy prefix."""
    if family not in SPM:
        return tiktoken_encoding(family).encode(unicodedata.normalize("NFC", text), allowed_special="all")
    ids = PUBLISHED[family][0]
    words = [re.escape(s) if not s.isalpha() else rf"(?<!\w){s}(?!\w)" for s in PARSED[family]]
    out = []
    for fragment in re.split(f"({'|'.join(words)})", text):
        out += [ids[fragment]] if fragment in ids else sp(family).encode(fragment) if fragment else []
    return out


def random_corpus(family: str, n: int = 300) -> list[str]:
    """Random strings from the family's own vocabulary mixed with whitespace, digits, CJK, emoji, rare chars."""
    rnd = random.Random(family)
    vocab = list(tokenizers.bundled_tokenizer(family).get_vocab())
    pool = list(" \n\t  中文字é\u0301🙂👍🏽 12345,.!?'s ㄅᚠ𝔘\u200b\u3000ﬁＡ①")
    words = [w.replace("▁", " ") for w in vocab if not w.startswith("<")] if family in SPM else []
    out = []
    for _ in range(n):
        k = rnd.randint(1, 12)
        out.append("".join(rnd.choice(words) if words and rnd.random() < 0.6 else rnd.choice(pool)
                           for _ in range(k)))
    return out


def with_specials(family: str) -> list[str]:
    specials = PARSED[family][:4] + PARSED[family][-2:]
    return [f"{s}Hello {s} world{s}\n{s}你好 {s}" for s in specials] + [
        "".join(specials), f"  {specials[1]}  lead and trail  {specials[2]}  ", f"{specials[2]}{specials[1]}x"]


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_ids_are_the_published_ones(family):
    tok = tokenizers.bundled_tokenizer(family)
    ids, size, (bos, eos, pad, unk) = PUBLISHED[family]
    assert {t: tok.convert_tokens_to_ids(t) for t in ids} == ids
    assert len(tok) == size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (bos, eos, pad, unk)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_text_gives_the_original_ids(family):
    tok = tokenizers.bundled_tokenizer(family)
    for text in CORPUS + random_corpus(family):
        if any(s in text for s in PARSED[family]):
            continue
        assert tok.encode(text, add_special_tokens=False) == original_plain(family, text), repr(text)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_strings_in_text_are_parsed_as_the_original_parses_them(family):
    tok = tokenizers.bundled_tokenizer(family)
    for text in with_specials(family) + CORPUS:
        assert tok.encode(text, add_special_tokens=False) == original_parsed(family, text), repr(text)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_special_tokens_encodes_special_strings_as_plain_text(family):
    tok = tokenizers.bundled_tokenizer(family)
    for text in with_specials(family) + CORPUS:
        assert tok.encode(text, add_special_tokens=False, split_special_tokens=True) == original_plain(
            family, text), repr(text)


def test_chatglm3_sop_and_eop_are_tokens_only_as_whole_words():
    tok = tokenizers.bundled_tokenizer("chatglm3")
    assert tok.encode("people isopropyl", add_special_tokens=False) == sp("chatglm3").encode("people isopropyl")
    assert tok.encode("[gMASK]sop<|user|>", add_special_tokens=False) == [64790, 64792, 64795]


@pytest.mark.parametrize("family,prefix", [("chatglm3", [64790, 64792]), ("llama2", [1]), ("baichuan2", []),
                                           ("qwen1", []), ("qwen2_5", [])])
def test_tokenizer_call_adds_the_originals_prefix_tokens(family, prefix):
    tok = tokenizers.bundled_tokenizer(family)
    assert tok("Hi there").input_ids == prefix + original_plain(family, "Hi there")


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_tokenizer_reloads_with_identical_ids(family):
    built = tokenizers.build_tokenizer(family, FIX / family)
    reloaded = tokenizers.bundled_tokenizer(family)  # save_pretrained, then AutoTokenizer.from_pretrained(dir)
    assert reloaded.is_fast and len(reloaded) == len(built)
    assert reloaded.chat_template == built.chat_template
    assert reloaded.all_special_ids == built.all_special_ids
    for text in CORPUS + with_specials(family):
        assert reloaded(text).input_ids == built(text).input_ids, repr(text)


@pytest.mark.parametrize("family,original", [("chatglm3", "tokenizer.model"), ("qwen1", "qwen.tiktoken")])
def test_fixture_dir_keeps_the_original_files_for_llama_cpp(family, original):
    directory = tokenizers.bundled_tokenizer_dir(family)
    assert (directory / original).read_bytes() == (FIX / family / original).read_bytes()
    assert (directory / "tokenizer.json").is_file()


def test_fixture_dir_is_built_once_and_keyed_by_content(tmp_path, monkeypatch):
    root = tmp_path / "tokenizers"
    shutil.copytree(FIX / "llama2", root / "llama2")
    monkeypatch.setenv("FINETUNE_TOKENIZERS", str(root))
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    first = tokenizers.bundled_tokenizer_dir("llama2")
    stamp = (first / "tokenizer.json").stat().st_mtime_ns
    assert first.parent == tmp_path / "cache" / "tokenizers" and first.name.startswith("llama2-")
    assert tokenizers.bundled_tokenizer_dir("llama2") == first
    assert (first / "tokenizer.json").stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary directory left behind

    (root / "llama2" / "tokenizer.model").write_bytes((FIX / "chatglm3" / "tokenizer.model").read_bytes())
    assert tokenizers.bundled_tokenizer_dir("llama2") != first


def test_missing_original_files_are_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_TOKENIZERS", str(tmp_path))
    with pytest.raises(UserError, match="FINETUNE_TOKENIZERS"):
        tokenizers.bundled_tokenizer_dir("qwen1")
    with pytest.raises(UserError, match="did you mean"):
        tokenizers.build_tokenizer("qwen", tmp_path)


def test_special_tokens_stated_in_the_sources_tokenizer_config_win(tmp_path):
    shutil.copytree(FIX / "llama2", tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<unk>"}))
    tok = tokenizers.build_tokenizer("llama2", tmp_path)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
