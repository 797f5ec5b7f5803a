"""The key=value options of `finetune chat` and `finetune serve` (schemas for cli._infer_options, no heavy imports).

What to load is the same for both (and for `finetune eval`): `run=` a training run, or `model=` a registry name, hub
id or local directory, with an optional `adapter=` (one PEFT adapter) or `adapters=name:path,...` (several, chosen
per request by name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Backend = Literal["transformers", "gguf", "vllm"]
Dtype = Literal["auto", "fp32", "bf16", "fp16"]

TEXT_KEYS = ("prompt", "system")
"""Free text, taken verbatim from argv: OmegaConf would read `prompt=true` as a bool and `${...}` as interpolation."""


@dataclass
class LoadOptions:
    run: Optional[str] = None  # a training run directory (its base + adapter, or its full weights)
    model: Optional[str] = None  # registry name, hub id or local directory (instead of run=, or as run='s base)
    adapter: Optional[str] = None  # one PEFT adapter directory on top of model=
    adapters: Optional[str] = None  # name1:path1,name2:path2 — several adapters on one base, chosen by name
    backend: Backend = "transformers"
    quant: Optional[str] = None  # backend=gguf: which export/gguf/model-<quant>.gguf (default: the one exported)
    dtype: Dtype = "auto"  # auto: fp32 on a CPU, bf16 (fp16 where unsupported) on a GPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class ChatOptions(LoadOptions):
    prompt: Optional[str] = None  # one-shot: print the answer to this message and exit
    system: Optional[str] = None  # the system prompt (default: the run's data.system_prompt, else the family's)
    temperature: float = 0.0  # 0 = greedy: the same answer every time, the one evaluation sees
    top_p: float = 1.0
    max_tokens: int = 512
    seed: Optional[int] = None


@dataclass
class ServeOptions(LoadOptions):
    host: str = "127.0.0.1"  # local only; host=0.0.0.0 exposes it (set api_key= then)
    port: int = 8000
    api_key: Optional[str] = None  # required as `Authorization: Bearer KEY`; default $FINETUNE_API_KEY
    max_tokens: int = 512  # the default when a request gives none, and the most one may ask for
    name: Optional[str] = None  # the model id to serve the run or model= under (default: the run's directory name)
    # bounds on one request (one worker serves everyone): OpenAI's API takes at most 4 stop sequences
    max_body_bytes: int = 2**20
    max_messages: int = 256
    max_stop: int = 4
    max_stop_chars: int = 256
    queue: int = 64  # requests running or waiting; more get 429 with Retry-After
    request_timeout_s: float = 300.0
