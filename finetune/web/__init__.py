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
from typing import Optional

from finetune import hosts
from finetune.errors import UserError


@dataclass
class WebOptions:
    host: str = "127.0.0.1"  # local only; any other address needs sign-in (auth_file= or $FINETUNE_WEB_AUTH)
    port: int = 7860
    outputs: str = "outputs"  # where runs are started and listed (the CLI's default output_dir parent)
    auth_file: Optional[str] = None  # lines of user:password; the page then asks to sign in


def serve(options: WebOptions) -> int:
    """Start the page; refused (before gradio loads) on a non-loopback host without sign-in: the page trains,
    writes files and loads models on this machine for whoever reaches it."""
    from finetune.web import guard

    users = guard.credentials(options.auth_file)
    if not users and not hosts.is_loopback(options.host):
        raise UserError(f"host={options.host} lets other machines reach the page, which trains and writes files "
                        f"here: set sign-in first with auth_file=PATH (lines of user:password) or "
                        f"{guard.AUTH_ENV}=user:password, or keep host=127.0.0.1")
    if importlib.util.find_spec("gradio") is None:
        raise UserError("`finetune web` needs gradio, which is not installed: pip install 'finetune[web]'")
    from finetune.web import app

    app.launch(options, users)
    return 0
