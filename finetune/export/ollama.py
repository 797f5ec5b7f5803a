"""An Ollama model directory: the GGUF plus a Modelfile that reproduces the training chat format exactly.

Ollama ships no template for ChatGLM3 or Baichuan2 and guesses from GGUF metadata otherwise, which is how exported
models end up answering in the wrong format and never stopping. So the Modelfile states everything:
TEMPLATE (the family's ChatFormat.ollama_template, tested token for token against our training ids through llama.cpp),
PARAMETER stop for every stop token of the format, a num_ctx a conversation can use (context_length), and the
system prompt the run trained with (or the family's default). The Modelfile runs a route that passed the export's
verification: the merged GGUF, or the base GGUF + ADAPTER (the LoRA as GGUF, which keeps the fine-tune's delta
exact where quantizing the merged weights rounded it away); `Modelfile.adapter` offers the pair as well, for users
who keep one base and several adapters.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from finetune import atomic
from finetune.models import chat


def _quoted(value: str) -> str:
    """A one-line Modelfile value in double quotes (Ollama's parser strips them, with no escape processing)."""
    if '"' in value or "\n" in value:
        raise ValueError(f"a quoted Modelfile value cannot contain quotes or newlines: {value!r}")
    return f'"{value}"'


def _block(value: str) -> str:
    """A multi-line Modelfile value: taken verbatim between triple quotes (which it must not contain)."""
    if '"""' in value:
        raise ValueError(f'a Modelfile block cannot contain """: {value!r}')
    return f'"""{value}"""'


def modelfile(template: str, source: str, *, num_ctx: int, system: Optional[str] = None,
              adapter: Optional[str] = None) -> str:
    """The Modelfile text for chat format `template`, FROM `source` (a path relative to the Modelfile)."""
    fmt = chat.get(template)
    system = system if system is not None else fmt.default_system
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f"TEMPLATE {_block(fmt.ollama_template)}")
    if system:
        lines.append(f"SYSTEM {_block(system)}")
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in fmt.stop_tokens]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def model_name(text: str) -> str:
    """An Ollama model name from a run name: lowercase letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._") or "finetuned"


def write_dir(dst: Path, template: str, model_gguf: Path, *, num_ctx: int, system: Optional[str],
              adapter_gguf: Optional[Path] = None, alternative: Optional[tuple[Path, Path]] = None) -> Path:
    """dst/ with the GGUF files and a Modelfile running `model_gguf` (+ ADAPTER `adapter_gguf`), and
    Modelfile.adapter running the (base, adapter) pair `alternative` when given; atomically."""
    with atomic.directory(dst, replace=True) as tmp:
        for path in filter(None, (model_gguf, adapter_gguf, *(alternative or ()))):
            if not (tmp / path.name).exists():
                atomic.link_or_copy(path, tmp / path.name)
        atomic.write_text(tmp / "Modelfile", modelfile(
            template, f"./{model_gguf.name}", num_ctx=num_ctx, system=system,
            adapter=f"./{adapter_gguf.name}" if adapter_gguf else None))
        if alternative:
            base, adapter = alternative
            atomic.write_text(tmp / "Modelfile.adapter", modelfile(
                template, f"./{base.name}", num_ctx=num_ctx, system=system, adapter=f"./{adapter.name}"))
    return dst


DEFAULT_CONTEXT = 4096


def context_length(train_max_length: int, model_dir: Path) -> int:
    """num_ctx for the Modelfile: a context a conversation can use — the larger of the training length and
    DEFAULT_CONTEXT, capped by the model's own (max_position_embeddings / seq_length). Ollama's own default is
    2048-4096 depending on version; a short training max_length (e.g. 128) would cut every real conversation."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    own = next((int(config[k]) for k in ("max_position_embeddings", "seq_length") if config.get(k)), None)
    wanted = max(train_max_length, DEFAULT_CONTEXT)
    return min(wanted, own) if own else wanted


def create_command(name: str, directory: Path, modelfile_name: str = "Modelfile") -> str:
    return f"ollama create {name} -f {directory.resolve() / modelfile_name}"


def model_tag(run: Path, name: Optional[str] = None) -> str:
    """The name an export is created under in Ollama: `name` when the user gave one, else the run directory's."""
    return name or model_name(run.name)


def create_commands(tag: str, directory: Path) -> list[str]:
    """The `ollama create` lines for an Ollama directory: its Modelfile as `tag`, and Modelfile.adapter (when written)
    as `tag`-adapter. The export prints them and the demo quotes the first: a line users copy is built in one place."""
    lines = [create_command(tag, directory)]
    if (directory / "Modelfile.adapter").is_file():
        lines.append(create_command(f"{tag}-adapter", directory, "Modelfile.adapter"))
    return lines


def smoke_test(name: str, directory: Path, prompt: str = "Hello!") -> Optional[str]:
    """With an `ollama` binary on PATH: create the model and get one answer, as a line for the summary;
    None when there is no ollama here."""
    ollama = shutil.which("ollama")
    if ollama is None:
        return None
    try:
        subprocess.run([ollama, "create", name, "-f", str(directory / "Modelfile")], check=True,
                       capture_output=True, text=True, timeout=600)
        done = subprocess.run([ollama, "run", name, prompt], check=True, capture_output=True, text=True,
                              timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = (getattr(exc, "stderr", None) or str(exc)).strip().splitlines()[-1:]
        return f"ollama could not create/run {name} ({' '.join(detail)}); is `ollama serve` running?"
    return f"ollama created {name}; it answered {prompt!r} with {done.stdout.strip()[:200]!r}"
