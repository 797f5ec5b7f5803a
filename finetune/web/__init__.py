"""`finetune web`: the whole path on one local page — estimate, train, watch, export, chat.

Everything the page does is the CLI's own code: recipes through `finetune.config`, the verdict and chart through
`finetune.estimate.report`, runs read through `finetune.rundir`, training and export as real `python -m finetune`
subprocesses (the page never blocks, and the command it ran is shown so it can be copied), chat through
`finetune.infer`. Gradio is an optional extra, imported only when the page starts, so every module here imports
without it and the callbacks (`forms`, `runs`, `jobs`, `chat`) are plain functions a test can call.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from finetune.errors import UserError


@dataclass
class WebOptions:
    host: str = "127.0.0.1"  # local only; host=0.0.0.0 exposes the page (and the machine's GPUs) to the network
    port: int = 7860
    outputs: str = "outputs"  # where runs are started and listed (the CLI's default output_dir parent)


def serve(options: WebOptions) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise UserError("`finetune web` needs gradio, which is not installed: pip install 'finetune[web]'")
    from finetune.web import app

    app.launch(options)
    return 0
