"""The Chat tab: a run's model through the chat command's backend (finetune.infer), loaded once per run.

The same Engine `finetune chat` builds: the run's chat format and system prompt, greedy by default, so the page
answers exactly as `finetune chat run=RUN prompt=...` does.
"""

from __future__ import annotations

import threading
from typing import Any

from finetune.errors import UserError
from finetune.infer import load
from finetune.infer.generate import Sampling
from finetune.infer.options import ChatOptions
from finetune.web import guard

_LOADED: dict[str, Any] = {}
"""The one model the tab holds (run path → Engine): choosing another run frees it first, so clicking through runs
never holds more than one model in memory."""
_LOCK = threading.Lock()


def engine(run: str) -> Any:
    from finetune.infer import backends  # (torch: only when the tab first answers)

    with _LOCK:
        if run not in _LOADED:
            _LOADED.clear()
            options = ChatOptions(run=run)
            _LOADED[run] = backends.load(load.resolve(options), options)
        return _LOADED[run]


def reply(outputs: str, run: str, message: str, history: list[dict[str, str]], max_tokens: int = 512
          ) -> tuple[list[dict[str, str]], str]:
    """(the conversation with the new turn, an error line or ""). A failed turn leaves the history as it was.
    Only runs inside the outputs folder are loaded."""
    if not run:
        return history, "error: choose a run first"
    if not (message or "").strip():
        return history, ""
    try:
        chat = engine(str(guard.inside(outputs, run)))
        turn = [*history, {"role": "user", "content": message}]
        done = chat.generate(chat.prompt_ids(turn), Sampling(max_tokens=max_tokens))
    except (UserError, ValueError) as exc:
        return history, f"error: {exc}"
    return [*turn, {"role": "assistant", "content": done.text}], ""
