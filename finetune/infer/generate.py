"""One answer from a loaded model: the family's inference prompt ids, token by token, the family's stops.

Every backend only yields token ids (`Backend.tokens`); what turns them into an answer is here, once, so the
terminal chat, the HTTP server and evaluation give the same text for the same ids:
- the prompt is the chat format's `encode_prompt`: the ids the official chat code builds (the ones training used);
- generation ends at the format's stop tokens (`stop_token_ids`), a request's stop strings or max_tokens;
- text is decoded incrementally (a window of ids, held back while it ends inside a UTF-8 character), special tokens
  skipped, and stripped at both ends as the official chat code does (ChatGLM3's reply begins with its metadata
  newline). So the streamed deltas add up to exactly the final text: whitespace at the end and anything that may be
  the start of a stop string wait until the next token shows what they are.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Protocol

from finetune.infer import tools as tool_calls
from finetune.models import chat


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()  # stop strings: the answer ends before the first one
    seed: Optional[int] = None


@dataclass
class Completion:
    text: str = ""
    finish_reason: str = "length"  # stop | length | tool_calls | cancelled
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated tokens, the stop token included
    token_ids: list[int] = field(default_factory=list)  # generated ids, the stop token excluded
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-shaped


class Backend(Protocol):
    """Runs the model: prompt ids in, generated ids out (at most sampling.max_tokens), for one served model name."""

    context_length: int

    def tokens(self, prompt: list[int], sampling: Sampling, model: str) -> Generator[int, None, None]: ...


class TextStream:
    """Generated ids in, text deltas out (see the module docstring for what is held back and why)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.raw, self.sent, self.stopped = "", 0, False
        self._prefix = self._read = 0  # decode window: ids[_prefix:_read] were decoded already

    def push(self, ids: list[int]) -> str:
        """The new text once `ids` (every id generated so far) has grown by one."""
        decode = lambda part: self.tokenizer.decode(part, skip_special_tokens=True)  # noqa: E731
        before, now = decode(ids[self._prefix:self._read]), decode(ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.raw += now[len(before):]
            self._prefix, self._read = self._read, len(ids)
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    @property
    def text(self) -> str:
        return self._answer(final=True)[: self.sent]

    def _answer(self, final: bool) -> str:
        text = self.raw.lstrip()
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, text, final = True, text[: min(found)], True
        text = text.rstrip()
        if not final:
            text = text[: len(text) - self._partial_stop(text)]
        return text

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string (it may complete with the next token)."""
        return max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def _release(self, final: bool) -> str:
        text = self._answer(final)
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return delta


class Engine:
    """A loaded model with its tokenizer and chat format: messages in, an answer out (streamed through on_text)."""

    def __init__(self, backend: Backend, tokenizer: Any, template: str, models: list[str],
                 system: Optional[str] = None):
        self.backend, self.tokenizer, self.template = backend, tokenizer, template
        self.models = models  # the names `model=` may take; the first is the default
        self.system = system  # for conversations without a system message (the run's data.system_prompt, as in
        #                       training; None: the family's default)
        self.chat = chat.get(template)
        self.stop_ids = set(self.chat.stop_token_ids(tokenizer))
        self.supports_tools = self.chat.tools is not None

    def prompt_ids(self, messages: list[dict], tools: Optional[list] = None) -> list[int]:
        """The inference prompt; ValueError (a message for the user) for a conversation the format refuses."""
        if self.system and messages and messages[0].get("role") != "system":  # as training's data.render.with_system
            messages = [{"role": "system", "content": self.system}, *messages]
        return self.chat.encode_prompt(self.tokenizer, messages, tools=tools or None)

    def room(self, prompt: list[int]) -> int:
        """How many tokens the answer may have; ValueError when the prompt fills the context."""
        room = self.backend.context_length - len(prompt)
        if room <= 0:
            raise ValueError(f"the conversation is {len(prompt)} tokens; the model's context is "
                             f"{self.backend.context_length}: shorten it or start a new one")
        return room

    def generate(self, prompt: list[int], sampling: Sampling = Sampling(), *, model: Optional[str] = None,
                 tools: bool = False, on_text: Optional[Callable[[str], None]] = None,
                 cancel: Optional[threading.Event] = None) -> Completion:
        """The answer to `prompt` (from prompt_ids), deltas sent to on_text as they come. With `tools` (the prompt
        offered some) the text is held to the end, where it is either tool calls or one content delta: a call
        cannot be told from text before it is complete."""
        sampling = replace(sampling, max_tokens=min(sampling.max_tokens, self.room(prompt)))
        stops = sampling.stop + (self.chat.tool_stops if tools else ())
        done, stream = Completion(prompt_tokens=len(prompt)), TextStream(self.tokenizer, stops)
        send = None if tools else on_text
        if cancel is not None and cancel.is_set():  # its client left while it waited its turn
            done.finish_reason = "cancelled"
            return done
        generated = self.backend.tokens(prompt, sampling, model or self.models[0])
        try:
            for token in generated:
                done.completion_tokens += 1
                if token in self.stop_ids:
                    done.finish_reason = "stop"
                    break
                done.token_ids.append(token)
                delta = stream.push(done.token_ids)
                if send and delta:
                    send(delta)
                if stream.stopped:
                    done.finish_reason = "stop"
                    break
                if cancel is not None and cancel.is_set():
                    done.finish_reason = "cancelled"
                    break
        finally:
            generated.close()  # a backend stops computing (and frees its cache) at once
        delta = stream.finish()
        if send and delta:
            send(delta)
        done.text = stream.text
        if tools:
            content, done.tool_calls = tool_calls.parse(self.chat, done.text)
            if done.tool_calls:
                done.text, done.finish_reason = content or "", "tool_calls"
            if on_text and done.text:
                on_text(done.text)
        return done
