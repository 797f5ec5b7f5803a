"""Merge a run's LoRA adapter into its base, in 16-bit, as a native transformers checkpoint.

For a QLoRA run the adapter goes into the UN-quantized base (base.json's native directory, loaded in 16-bit), never
into the 4-bit weights it was trained against: rounding the base to 4 bits and then baking the adapter in would ship
the quantization error twice (once in the merge, again when llama.cpp quantizes). A method=full run is re-saved in
16-bit the same way. The adapter is checked against the base before anything heavy happens (target modules exist,
every LoRA matrix fits its base weight), so "an adapter for another base" is one clear error, not a shape traceback
half-way through a 14 GB load.

A reward model (stage=rm) merges as what it is: AutoModelForSequenceClassification with its trained `score` head
(from adapter/ for LoRA, from model/ for full/freeze). A PiSSA / OLoRA adapter was already saved converted to apply
to the original base (session.save_weights), so it merges like any other.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from finetune import atomic
from finetune.errors import UserError
from finetune.rundir import RunDir

SHARD_SIZE = "2GB"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "qwen.tiktoken", "vocab.json", "merges.txt", "chat_template.jinja")
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


def merged_dtype(precision: str) -> torch.dtype:
    """bf16 runs stay bf16; everything else ships as f16 (what llama.cpp's f16 GGUF holds, so no second rounding)."""
    return torch.bfloat16 if precision == "bf16" else torch.float16


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors checkpoint, read from the file headers (no weights loaded)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no *.safetensors weights; the base in base.json must be a native checkpoint "
                        f"(`finetune convert` writes one)")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def check_adapter(adapter_dir: Path, base_dir: Path, base_name: str) -> None:
    """Refuse an adapter that does not belong to this base: missing target modules or LoRA shapes that do not fit."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = tensor_shapes(base_dir)
    modules = {name[: -len(".weight")] for name in base if name.endswith(".weight")}
    recorded = cfg.get("base_model_name_or_path") or "?"
    hint = (f"adapter/ says it was trained on '{recorded}', base.json says {base_name} ({base_dir}); export the run "
            f"whose base matches, or fix base.json")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in modules):
            raise UserError(f"adapter target_modules pattern '{targets}' matches no module of the base; {hint}")
    else:
        missing = sorted(t for t in targets if not any(m == t or m.endswith("." + t) for m in modules))
        if missing:
            raise UserError(f"adapter targets {', '.join(missing)}, which the base has no module named; {hint}")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter_dir}: adapter_model.safetensors is missing; the run's training did not finish "
                        f"saving — train again or pass a finished run")
    with safe_open(weights, framework="pt") as handle:
        for key in handle.keys():
            match = _LORA_KEY.match(key.removeprefix(_PEFT_PREFIX))
            if not match:
                continue
            module, part = match["module"], match["part"]
            shape = tuple(handle.get_slice(key).get_shape())
            want = base.get(f"{module}.weight")
            if want is None:
                raise UserError(f"adapter has LoRA weights for {module}, which the base does not have; {hint}")
            fits = shape[1] == want[1] if part == "A" else shape[0] == want[0]
            if len(want) != 2 or not fits:
                raise UserError(f"adapter's {module}.lora_{part} has shape {list(shape)}, which does not fit the "
                                f"base weight {list(want)}; {hint}")


def copy_tokenizer(sources: list[Path], dst: Path) -> None:
    """The tokenizer files, later sources first: what training saved beside the adapter wins, and original files
    only the base has (tokenizer.model, qwen.tiktoken — llama.cpp's converter reads them) are kept."""
    if not any((src / "tokenizer_config.json").is_file() for src in sources):
        raise UserError(f"no tokenizer (tokenizer_config.json) in {' or '.join(map(str, sources))}")
    for src in reversed(sources):
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)


def merge(run: RunDir, dst: Path) -> Path:
    """Write the 16-bit merged (or re-saved full) model of `run` to `dst`, atomically; returns `dst`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import finetune.models.native  # noqa: F401  (registers the native classes, e.g. Baichuan2-13B's ALiBi model)

    recipe = run.recipe()
    if run.has_adapter:
        info = run.base()
        base_dir = info.directory
        if not (base_dir / "config.json").is_file():
            raise UserError(f"the run's base model {base_dir} (base.json 'path') is gone; restore it or edit "
                            f"{run.base_file}")
        config = json.loads((base_dir / "config.json").read_text())
        if "quantization_config" in config:
            raise UserError(f"{base_dir} holds quantized weights; merging needs the 16-bit base the adapter was "
                            f"trained on (base.json 'path' must point at the un-quantized native checkpoint)")
        check_adapter(run.adapter_dir, base_dir, info.model or "?")
        source, tokenizer_dirs = base_dir, [run.adapter_dir, base_dir]
    elif run.has_full_model:
        source, tokenizer_dirs = run.model_dir, [run.model_dir]
    else:
        raise UserError(f"{run.path} has no adapter ({run.adapter_dir}/adapter_config.json) and no full model "
                        f"({run.model_dir}/config.json): its training did not finish; export a finished run")

    dtype = merged_dtype(recipe.train.precision)
    reward = recipe.stage == "rm"
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = auto.from_pretrained(source, dtype=dtype, **({"num_labels": 1} if reward else {}))
    if run.has_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run.adapter_dir).merge_and_unload()
    with atomic.directory(dst, replace=True) as tmp:
        model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        copy_tokenizer(tokenizer_dirs, tmp)
    return dst
