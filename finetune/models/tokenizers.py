"""Fast tokenizers built from the ORIGINAL tokenizer files of each family, without remote code.

Exact token ids are the contract, not a tokenizer class: training, inference and every export must see the ids the
original tokenizer gives. Each family's `tokenizers` pipeline is assembled here so that
`tok.encode(text, add_special_tokens=False)` gives them:
- SentencePiece families (chatglm3, baichuan2, llama2): a BPE whose merges are every split of every normal piece,
  ranked by the piece's score (what SentencePiece's BPE maximises), byte fallback, and the dummy prefix as a
  normaliser. A text fragment between special tokens gets its own dummy prefix, as the legacy slow tokenizers and
  llama.cpp do: that is what makes chat-template TEXT (e.g. `<s>[INST] ...`, `<|user|>\n ...`) tokenize to the
  ids the official code builds segment by segment. Baichuan2's user-defined pieces (`<reserved_106>`, `\n`, ...)
  are matched in text as SentencePiece itself matches them; ChatGLM3's `sop`/`eop` only as whole words
  ("people" keeps its ids).
- qwen1: byte-level BPE from qwen.tiktoken with the merges tiktoken's BPE makes (one per token, derived by running
  it: they equal Qwen2.5's merges), NFC as the original `tokenize` does, Qwen-1's own special tokens (not
  Qwen2.5's tokenizer.json).
- qwen2_5: its tokenizer.json as published.
`split_special_tokens=True` encodes special-token strings as plain text, as the originals' chat code does for
message contents (SentencePiece/tiktoken with no special parsing).
The saved directory reloads with `AutoTokenizer.from_pretrained(dir)` (class `TokenizersBackend`, tokenizer.json
used as is) and carries the family's chat format as its chat_template (finetune.models.chat); the original files are
copied beside it for tools that read them (llama.cpp's converter).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable, Optional

import tokenizers
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from finetune import atomic, shipped
from finetune.errors import UserError, did_you_mean
from finetune.models import chat, registry
from finetune.models.registry import ModelSpec

BUNDLED = shipped.TOKENIZER_FILES
CONFIG = "tokenizer_config.json"  # read for special tokens and model_max_length when the source has one

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN1_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
CHATGLM3_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                     "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
CHATGLM3_WORDS = ("sop", "eop")  # plain words: matched as special tokens only when standing alone ("people")


def _spm_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _spm_backend(path: Path) -> Tokenizer:
    """SentencePiece BPE as a `tokenizers` pipeline giving SentencePiece's ids (see module docstring)."""
    proto = _spm_proto(path)
    normal, user_defined, control, unknown = 1, 4, 3, 2
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces if p.type == normal}
    ranked = []
    for piece, score in scores.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in scores and right in scores:
                ranked.append((-score, vocab[piece], vocab[left], left, right))
    ranked.sort()
    unk = next(p.piece for p in proto.pieces if p.type == unknown)
    tok = Tokenizer(BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked], unk_token=unk,
                        fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback))
    dummy = proto.normalizer_spec.add_dummy_prefix
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if dummy else []) + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if dummy else []))
    tok.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                            for p in proto.pieces if p.type in (control, unknown)])
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=False)
                    for p in proto.pieces if p.type == user_defined])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table that byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _tiktoken_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The last merge tiktoken's BPE makes when it builds `token` (GPT-2 style merges: one per token)."""
    splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
    if len(splits) == 1:
        return splits[0]
    limit, parts = ranks[token], [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= limit:
            raise ValueError(f"qwen.tiktoken: token {token!r} cannot be built by merges (not a BPE vocabulary)")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def _qwen1_backend(source: Path) -> Tokenizer:
    """qwen.tiktoken as byte-level BPE with tiktoken's merges; `ignore_merges` = tiktoken's whole-piece lookup."""
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in (source / "qwen.tiktoken").read_bytes().splitlines() if line)}
    table = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    merges = [_tiktoken_merge(ranks, token) for token in sorted(ranks, key=ranks.get) if len(token) > 1]
    tok = Tokenizer(BPE(vocab={text(t): r for t, r in ranks.items()},
                        merges=[(text(a), text(b)) for a, b in merges], ignore_merges=True))
    tok.normalizer = normalizers.NFC()  # the original tokenize() normalises NFC before tiktoken
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in QWEN1_SPECIALS])
    return tok


def _chatglm3_backend(source: Path) -> Tokenizer:
    """tokenizer.model + the nine command tokens ChatGLM3's tokenizer code appends (ids 64789..64797)."""
    tok = _spm_backend(source / "tokenizer.model")
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True, single_word=s in CHATGLM3_WORDS)
                            for s in CHATGLM3_SPECIALS])
    return tok


@dataclass(frozen=True)
class TokenizerFacts:
    """How one family's original tokenizer is read and which special tokens it declares."""

    files: tuple[str, ...]  # original files read (and copied beside the saved tokenizer)
    backend: Callable[[Path], Tokenizer]
    specials: dict[str, Optional[str]]  # bos/eos/pad/unk as the original sets them (tokenizer_config.json wins)
    prefix: tuple[str, ...] = ()  # tokens `tokenizer(text)` puts first (add_special_tokens=True)
    init: dict = field(default_factory=dict)  # other tokenizer_config keys of the original


FAMILY_TOKENIZERS: dict[str, TokenizerFacts] = {
    "chatglm3": TokenizerFacts(
        ("tokenizer.model",), _chatglm3_backend,
        {"bos_token": None, "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"},
        prefix=("[gMASK]", "sop"), init={"padding_side": "left"}),
    "baichuan2": TokenizerFacts(
        ("tokenizer.model",), lambda src: _spm_backend(src / "tokenizer.model"),
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"},
        init={"model_max_length": 4096}),
    "qwen1": TokenizerFacts(
        ("qwen.tiktoken",), _qwen1_backend,
        {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None},
        init={"model_max_length": 8192}),
    "qwen2_5": TokenizerFacts(
        ("tokenizer.json",), lambda src: Tokenizer.from_file(str(src / "tokenizer.json")),
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None},
        init={"model_max_length": 131072}),
    "llama2": TokenizerFacts(
        ("tokenizer.model",), lambda src: _spm_backend(src / "tokenizer.model"),
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "unk_token": "<unk>"},
        prefix=("<s>",)),
}


def _facts(family: str) -> TokenizerFacts:
    if family not in FAMILY_TOKENIZERS:
        raise UserError(f"no tokenizer recipe for family '{family}'{did_you_mean(family, FAMILY_TOKENIZERS)}")
    return FAMILY_TOKENIZERS[family]


def _published(source_dir: Path, facts: TokenizerFacts) -> tuple[dict, dict]:
    """bos/eos/pad/unk and model_max_length: the source's tokenizer_config.json where it states them (a base
    Qwen2.5 says eos <|endoftext|>), else the table's."""
    specials, init = dict(facts.specials), dict(facts.init)
    path = source_dir / CONFIG
    if path.is_file():
        try:
            published = json.loads(path.read_text())
        except ValueError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        for key in specials.keys() & published.keys():
            value = published[key]
            specials[key] = value.get("content") if isinstance(value, dict) else value
        if "model_max_length" in published:
            init["model_max_length"] = int(published["model_max_length"])
    return specials, init


def build_tokenizer(family: str, source_dir: Path) -> PreTrainedTokenizerFast:
    """The family's tokenizer from the original files in `source_dir` (as published in the model repo)."""
    facts, source_dir = _facts(family), Path(source_dir)
    missing = [f for f in facts.files if not (source_dir / f).is_file()]
    if missing:
        raise UserError(f"{source_dir}: missing {', '.join(missing)} (the original {family} tokenizer files)")
    backend = facts.backend(source_dir)
    specials, init = _published(source_dir, facts)
    if facts.prefix:
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join(f"{t}:0" for t in facts.prefix) + " $A:0",
            pair=" ".join(f"{t}:0" for t in facts.prefix) + " $A:0 $B:1",
            special_tokens=[(t, backend.token_to_id(t)) for t in facts.prefix])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                  **{k: v for k, v in specials.items() if v is not None}, **init)
    tok.chat_template = registry.family(family).chat.hf_template
    return tok


def _tokenizers_root() -> Path:
    return Path(os.environ.get("FINETUNE_TOKENIZERS") or BUNDLED)


def _cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", "~/.cache/finetune")).expanduser() / "tokenizers"


@cache
def _code_digest() -> str:
    """Everything that shapes the saved tokenizer: this code, the chat formats, the library versions."""
    h = hashlib.sha256()
    for path in (Path(__file__), *chat.SOURCES):
        h.update(path.read_bytes())
    h.update(f"{tokenizers.__version__} {transformers.__version__}".encode())
    return h.hexdigest()


def bundled_tokenizer_dir(family: str) -> Path:
    """A saved tokenizer for `family` built from the shipped tokenizer files (or $FINETUNE_TOKENIZERS), built once.

    Cached under $FINETUNE_CACHE/tokenizers/<family>-<hash of inputs and code>/, written to a temporary name and
    renamed when complete, so concurrent builders never see half a directory.
    """
    facts = _facts(family)
    source = _tokenizers_root() / family
    h = hashlib.sha256(_code_digest().encode())
    for name in facts.files:
        path = source / name
        if not path.is_file():
            raise UserError(f"{path} not found: the original {family} tokenizer files are needed "
                            f"(set FINETUNE_TOKENIZERS to the folder holding <family>/ directories)")
        h.update(name.encode() + path.read_bytes())
    if (source / CONFIG).is_file():
        h.update(CONFIG.encode() + (source / CONFIG).read_bytes())

    def build(path: Path) -> None:
        build_tokenizer(family, source).save_pretrained(path)
        for name in facts.files:
            if not (path / name).exists():
                shutil.copyfile(source / name, path / name)

    return atomic.build_once(_cache_root() / f"{family}-{h.hexdigest()[:16]}", build, marker="tokenizer.json")


def for_variant(spec: ModelSpec) -> Optional[PreTrainedTokenizerFast]:
    """The tokenizer a registry checkpoint carries, from the shipped files: what needs a tokenizer alone (`finetune
    data`) then downloads nothing. None for a variant with a vocabulary of its own (Chinese-LLaMA-2's 55,296), whose
    tokenizer only its repo has. A variant's config names its eos, as its published tokenizer_config does (Qwen2.5's
    base models end text with <|endoftext|>, the instruct ones with <|im_end|>)."""
    if "vocab_size" in spec.variant.config_overrides:
        return None
    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_dir(spec.family.name))
    eos = spec.original_config.get("eos_token_id")
    if isinstance(eos, int) and eos != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    return tokenizer


@cache
def bundled_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The fixture tokenizer, loaded once per process as a user would load it (shared: do not modify it)."""
    return AutoTokenizer.from_pretrained(bundled_tokenizer_dir(family))
