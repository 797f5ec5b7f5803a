"""A GGUF file as a base model: `model=path/to/file.gguf` (a llama.cpp export, or an Ollama model blob).

People often already have the model they want to fine-tune as a GGUF (Ollama keeps every pulled model as one under
~/.ollama/models/blobs). transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`, which reads it with
the `gguf` package) dequantizes it; we do that once per file into $FINETUNE_CACHE/converted/<family>-<hash>/ as a
native checkpoint in 16-bit safetensors with no quantization_config left (transformers refuses to save a model that
still carries the GGUF one), embeddings tied only when the GGUF has no separate `output.weight` (a quantized file
often stores the output layer apart, in another quant type: untying keeps the logits the file computes).

The family comes from the GGUF's metadata and is checked against the registry, because the chat format, stop tokens
and LoRA targets are the registry's: `qwen2` is Qwen2.5, `llama` with Llama-2's 32,000-token vocabulary is Llama-2;
anything else is one clear error naming the architecture. The tokenizer is the family's shipped one, checked token
by token against the GGUF's vocabulary, so training ids are exactly what llama.cpp and Ollama will see. The weights
keep the quantization's rounding error: every place that shows the base says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Optional

from finetune import atomic
from finetune.errors import UserError
from finetune.models import registry
from finetune.models.registry import ModelSpec

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
STORED_DTYPE = "bfloat16"  # what Qwen2.5 and Llama-2 publish; dequantized values are exact to bf16's 8 bits


@dataclass(frozen=True)
class FamilyRule:
    family: str
    vocab_size: Optional[int] = None  # required vocabulary size (tells Llama-2 from other `llama` GGUFs)


FAMILY_RULES: dict[str, FamilyRule] = {
    "qwen2": FamilyRule("qwen2_5"),
    "llama": FamilyRule("llama2", vocab_size=32000),
}
"""general.architecture → registry family (llama.cpp's architecture names, gguf-py's MODEL_ARCH_NAMES)."""


@dataclass(frozen=True)
class GGUFBase:
    """What a GGUF file is, read from its metadata only (no tensor data): enough to plan, estimate and load it."""

    path: Path
    architecture: str
    file_type: str  # the quantization the file was made with, as llama.cpp names it (e.g. Q4_K_M)
    name: str  # general.name
    spec: ModelSpec  # the registry model it is, its config adjusted to the file (tied or untied output)

    @property
    def note(self) -> str:
        """The one line every place that shows the base prints (dry run, run summary, report)."""
        return (f"base dequantized from {self.file_type} ({self.path.name}): it carries {self.file_type}'s rounding "
                f"error; a 16-bit original of the same model is better where you have one")


def is_gguf(name: str) -> bool:
    """`model=` names a GGUF file (by suffix, or by magic for a blob with no suffix, like Ollama's)."""
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == MAGIC


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _file_type(reader) -> str:
    from gguf import LlamaFileType

    code = _field(reader, "general.file_type")
    if code is None:
        return "unknown quantization"
    try:
        return LlamaFileType(int(code)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file type {code}"


def _words(text: str) -> set[str]:
    return set(re.split(r"[\s/_-]+", text.lower())) - {""}


def _variant(model: registry.Model, name: str) -> registry.Variant:
    """The variant whose hub id says most of what general.name says (e.g. "Qwen2.5 Coder 0.5B Instruct" →
    Qwen/Qwen2.5-Coder-0.5B-Instruct): words in common, less the id's words the name lacks."""
    said = _words(name)

    def score(variant: registry.Variant) -> int:
        words = _words(variant.hf_id.split("/")[-1])
        return len(words & said) - len(words - said)

    return max(model.variants, key=score)


@cache
def read(path: Path) -> GGUFBase:
    """The file's family, model and quantization, from metadata; one clear error for anything we cannot train."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model={path}: no such GGUF file")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise UserError(f"model={path}: not a readable GGUF file ({exc})") from None
    arch = str(_field(reader, "general.architecture", "?"))
    rule = FAMILY_RULES.get(arch)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    known = ", ".join(f"{a} ({registry.family(r.family).display}"
                      + (f", {r.vocab_size:,}-token vocabulary)" if r.vocab_size else ")")
                      for a, r in FAMILY_RULES.items())
    if rule is None or (rule.vocab_size and vocab != rule.vocab_size):
        what = f"architecture '{arch}'" + (f" with a {vocab:,}-token vocabulary" if rule and vocab else "")
        raise UserError(f"model={path}: a GGUF of {what}, which no family in finetune's registry has (it trains "
                        f"{known}); use a Hugging Face checkpoint of a registry model instead")
    shape = (_field(reader, f"{arch}.embedding_length"), _field(reader, f"{arch}.block_count"), vocab)
    family = registry.family(rule.family)
    models = [m for m in family.models if not m.tiny]
    match = next((m for m in models if registry.config_shape(registry.load_config(m.config_file)) == shape), None)
    if match is None:
        sizes = ", ".join(f"{m.size} {registry.config_shape(registry.load_config(m.config_file))[:2]}" for m in models)
        raise UserError(f"model={path}: a {family.display} GGUF of hidden size {shape[0]} and {shape[1]} layers, "
                        f"which is no {family.display} size in the registry ({sizes}: hidden, layers)")
    name = str(_field(reader, "general.name", path.stem))
    variant = _variant(match, name)
    tied = all(t.name != "output.weight" for t in reader.tensors)
    if registry.load_config(match.config_file).get("tie_word_embeddings") != tied:
        variant = dataclasses.replace(variant, config_overrides={**variant.config_overrides,
                                                                 "tie_word_embeddings": tied})
    return GGUFBase(path, arch, _file_type(reader), name, ModelSpec(family, match, variant))


def check_tokenizer(base: GGUFBase, tokenizer) -> None:
    """The family's tokenizer is the GGUF's, token for token, and the GGUF's end-of-turn token is one the family
    stops on; a chat template other than the family's is a warning (training and export use the family's)."""
    from gguf import GGUFReader

    reader = GGUFReader(base.path)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    ours = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    differ = [i for i, token in enumerate(ours) if i >= len(tokens) or tokens[i] != token]
    if differ:
        i = differ[0]
        raise UserError(f"model={base.path}: its vocabulary differs from {base.spec.family.display}'s at {len(differ)} "
                        f"ids (first: id {i} is {tokens[i] if i < len(tokens) else None!r} in the GGUF, {ours[i]!r} "
                        f"in {base.spec.family.display}'s tokenizer): not a model finetune can train with its format")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if eos is not None and tokens[int(eos)] not in base.spec.family.chat.stop_tokens:
        raise UserError(f"model={base.path}: it ends a turn with {tokens[int(eos)]!r}, which "
                        f"{base.spec.family.display}'s chat format never emits "
                        f"({', '.join(base.spec.family.chat.stop_tokens)})")
    template = _field(reader, "tokenizer.chat_template")
    published = getattr(tokenizer, "chat_template", None)
    if template and published and template.strip() != published.strip():
        log.info("%s carries its own chat template; training and export use %s's exact format", base.path.name,
                 base.spec.family.display)


def _cache_dir(base: GGUFBase) -> Path:
    """converted/<family>-<hash of the file's name, size and mtime and of this code>/ (like every conversion)."""
    from finetune.models.convert import cache_root, code_hash

    stat = base.path.stat()
    h = hashlib.sha256(f"{base.path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    h.update(code_hash(__name__).encode())
    return cache_root() / "converted" / f"{base.spec.family.name}-gguf-{h.hexdigest()[:16]}"


def dequantize(base: GGUFBase, out: Path) -> None:
    """The native checkpoint of `base` written into `out` (which the caller renames when complete)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from finetune.models import tokenizers

    family = base.spec.family
    tokenizer_dir = tokenizers.bundled_tokenizer_dir(family.name)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_tokenizer(base, tokenizer)
    log.info("dequantizing %s (%s) to %s safetensors", base.path.name, base.file_type, STORED_DTYPE)
    model = AutoModelForCausalLM.from_pretrained(base.path.parent, gguf_file=base.path.name,
                                                 dtype=getattr(torch, STORED_DTYPE))
    config = model.config
    if hasattr(config, "quantization_config"):  # the GGUF's: the saved weights are plain 16-bit tensors
        del config.quantization_config
    model.hf_quantizer = None
    config.architectures = [base.spec.native_class]
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(list(family.chat.stop_tokens)))
    model.save_pretrained(out)
    for item in tokenizer_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    for item in out.iterdir():
        item.chmod(0o644)  # a cache other users and tools read (safetensors' writer leaves 0600)
    atomic.write_json(out / "gguf_source.json", {"file": str(base.path), "file_type": base.file_type,
                                                 "name": base.name, "model": base.spec.name,
                                                 "variant": base.spec.variant.name})


def native_dir(base: GGUFBase) -> Path:
    """The dequantized checkpoint of `base`, built once (concurrent callers wait for one build)."""
    dst = _cache_dir(base)
    if (dst / "config.json").is_file():
        log.info("reusing the dequantized %s in %s", base.path.name, dst)
        return dst
    return atomic.build_once(dst, lambda path: dequantize(base, path), marker="config.json")


def source_of(native: Path) -> Optional[dict]:
    """What a dequantized checkpoint was made from (gguf_source.json), or None for any other checkpoint."""
    path = Path(native) / "gguf_source.json"
    return json.loads(path.read_text()) if path.is_file() else None


def named(name: str) -> GGUFBase:
    """The GGUF a `model=` (or `convert SRC`) string names, read once per process whatever the spelling."""
    return read(Path(name).expanduser().resolve())


def spec_for_estimate(name: str, variant: Optional[str] = None) -> ModelSpec:
    """registry.spec_for_estimate, for a GGUF file too: its metadata names the registry model (no tensor is read)."""
    return named(name).spec if is_gguf(name) else registry.spec_for_estimate(name, variant)


def note_for(name: str) -> Optional[str]:
    """The dequantization note for `model=name` when it is a GGUF file, else None."""
    return named(name).note if is_gguf(name) else None
