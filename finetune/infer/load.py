"""What `run=` / `model=` / `adapter(s)=` name, resolved to weights, tokenizer and chat format: a Source.

`resolve` reads only small files (base.json, recipe.yaml, adapter_config.json, config.json) and checks every adapter
against its base (export.merge.check_adapter) before any weight is read, so a wrong path or an adapter for
another base is one clear error, not a shape traceback after a long load. `backends.load` then builds the backend
and the Engine from the Source: the same object the chat, the server and evaluation use.

A run is served under its directory's name; `adapters=name:path,...` adds adapters on the same base (a path may
be an adapter directory, a trainer checkpoint or a run directory), each its own model; `model=` alone (or with
`adapter=`) also serves the bare base under the name given. Full-weight runs can take adapters too.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_args

from finetune import config
from finetune.errors import UserError, did_you_mean
from finetune.export.llamacpp import require_llama_cpp
from finetune.infer.options import Backend, LoadOptions
from finetune.rundir import RunDir, is_run, open_run

BACKENDS = get_args(Backend)
_NAME = re.compile(r"\w[\w.-]*")  # letters (any script), digits, _ . -


@dataclass(frozen=True)
class Source:
    """What to load, before loading it."""

    name: str  # the model id of the run or model itself
    weights: Path  # native-layout checkpoint: the base under the adapters, or a run's full weights
    tokenizer: Path  # directory holding the tokenizer (what training saved beside the adapter wins)
    template: str  # chat format (finetune.models.chat)
    adapters: dict[str, Path] = field(default_factory=dict)  # served name -> PEFT adapter directory
    serve_base: bool = True  # the bare weights are a model of their own (not for a LoRA run: its adapter is)
    system: Optional[str] = None  # the run's data.system_prompt (None: the family's default)
    registry_name: Optional[str] = None  # for the memory estimate
    run: Optional[RunDir] = None

    @property
    def models(self) -> list[str]:
        """Served model ids; the first is the default (the run, the adapter given, or the model)."""
        adapters = list(self.adapters)
        return adapters + [self.name] if self.serve_base else adapters


def parse_adapters(text: Optional[str]) -> dict[str, Path]:
    """`name1:path1,name2:path2` -> {name: adapter directory}; a run directory stands for its adapter/."""
    found: dict[str, Path] = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, path = item.partition(":")
        if not sep or not _NAME.fullmatch(name) or not path:
            raise UserError(f"adapters=: '{item}' is not name:path (a name is letters, digits, '.', '_', '-'), "
                            f"e.g. adapters=zh:outputs/run-zh,en:outputs/run-en")
        if name in found:
            raise UserError(f"adapters=: the name '{name}' is given twice")
        found[name] = adapter_dir(Path(path).expanduser())
    return found


def adapter_dir(path: Path) -> Path:
    """A PEFT adapter directory: `path` itself, or a run's adapter/."""
    if is_run(path):
        path = RunDir(path).adapter_dir
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{path} is not a PEFT adapter (no adapter_config.json); pass a run directory, its "
                        f"adapter/ or a checkpoint-N directory")
    return path


def _tokenizer_dir(*dirs: Path) -> Path:
    found = next((d for d in dirs if (d / "tokenizer_config.json").is_file()), None)
    if found is None:
        raise UserError(f"no tokenizer (tokenizer_config.json) in {' or '.join(map(str, dirs))}")
    return found


def _from_run(options: LoadOptions, extra: dict[str, Path]) -> Source:
    if options.model or options.adapter:
        raise UserError("run= already names the weights; give either run=DIR or model=... [adapter=...]")
    run = open_run(options.run)  # type: ignore[arg-type]
    info, recipe = run.base(), run.recipe()
    name = getattr(options, "name", None) or run.path.name
    common = dict(template=info.template, system=recipe.data.system_prompt, registry_name=info.model,
                  run=run)
    if run.has_adapter:
        base = info.directory
        if not (base / "config.json").is_file():
            raise UserError(f"the run's base model {base} (base.json 'path') is gone; restore it or edit "
                            f"{run.base_file}")
        return Source(name, base, _tokenizer_dir(run.adapter_dir, base), adapters={name: run.adapter_dir, **extra},
                      serve_base=False, **common)
    if run.has_full_model:
        return Source(name, run.model_dir, _tokenizer_dir(run.model_dir), adapters=extra, **common)
    raise UserError(f"{run.path} has no adapter/ and no model/: its training did not finish; pass a finished run")


def _from_model(options: LoadOptions, extra: dict[str, Path]) -> Source:
    from finetune.models import hub  # (huggingface_hub, transformers and torch: seconds, only for model=)

    resolved = hub.resolve(config.load(None, [f"model={options.model}"]))
    if resolved.spec is None:
        raise UserError(f"model={options.model}: not a family finetune knows, so its chat format is unknown; use a "
                        f"registry model (`finetune list models`) or a run")
    name = getattr(options, "name", None) or options.model
    adapters = dict(extra)
    if options.adapter:
        one = adapter_dir(Path(options.adapter).expanduser())
        adapters = {one.parent.name if one.name == "adapter" else one.name: one, **adapters}
    return Source(name, resolved.path, resolved.path, resolved.spec.family.template, adapters,
                  registry_name=resolved.spec.name)


def resolve(options: LoadOptions) -> Source:
    """The Source `options` name; every adapter checked against the base it will sit on."""
    if options.backend not in BACKENDS:
        raise UserError(f"unknown backend={options.backend}{did_you_mean(options.backend, BACKENDS)}; "
                        f"choose one of {', '.join(BACKENDS)}")
    if options.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError("backend=vllm needs vLLM, which is not installed here; `pip install vllm` on a Linux machine "
                        "with a CUDA GPU, or use backend=transformers / backend=gguf")
    if options.backend == "gguf":
        require_llama_cpp()
    if not options.run and not options.model:
        raise UserError("say what to load: run=outputs/<run> (a training run) or model=NAME [adapter=DIR]")
    extra = parse_adapters(options.adapters)
    source = _from_run(options, extra) if options.run else _from_model(options, extra)
    clash = [n for n in source.adapters if n == source.name and source.serve_base]
    if clash:
        raise UserError(f"adapter name '{clash[0]}' is also the base model's name; choose another")
    from finetune.export.merge import check_adapter  # (imports torch: after the checks that need none)

    for path in source.adapters.values():
        check_adapter(path, source.weights, source.registry_name or source.name)
    return source


def device_and_dtype(options: LoadOptions) -> tuple[str, Any]:
    """auto: the first GPU in bf16 (fp16 where bf16 is not supported), else the CPU in fp32 (CPUs are slow and
    inexact in 16-bit); an explicit dtype= wins."""
    import torch

    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device}: torch sees no CUDA GPU here; use device=cpu")
    if options.dtype == "auto":
        gpu = device.startswith("cuda")
        return device, (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if gpu else torch.float32
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[options.dtype]
