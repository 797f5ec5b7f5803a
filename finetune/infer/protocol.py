"""The OpenAI chat-completions wire format: the request read and checked, errors, and the pieces of a response.

Plain Python, so the rules are readable (and testable) in one place and the package imports without the `serve`
extra: a field of the wrong type or out of range is a 422 naming it; fields OpenAI has and we do not use are ignored
(as OpenAI ignores unknown ones); `developer` is OpenAI's newer name for `system`; content parts must be text;
`max_completion_tokens` is the newer name for `max_tokens`; an answer cut short because its client left is reported
as `stop` (no client is there to read it).

Every request is bounded (`Limits`), because one worker serves everyone: the body, the number of messages, the stop
strings (OpenAI's API takes at most 4; each is matched against the answer at every token, so their length is
bounded too), max_tokens (a hard cap, not only a default), the time a request may take and the queue. Numbers must
be finite: JSON's NaN and Infinity (which Python's json module accepts) are refused, since `temperature: NaN` would
turn sampling into always picking the last vocabulary id.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from finetune.infer.generate import Completion, Sampling

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (each a `finetune serve` option of the same name)."""

    max_body_bytes: int = 2**20
    max_messages: int = 256
    max_stop: int = 4  # OpenAI's API: "Up to 4 sequences where the API will stop generating further tokens"
    max_stop_chars: int = 256
    max_tokens: int = 512  # the default when a request names none, and the most a request may have
    queue: int = 64  # requests admitted (running or waiting); one more is a 429
    request_timeout_s: float = 300.0  # from arrival to the last token; the answer then ends as "length"


class APIError(Exception):
    """An error for the client: its HTTP status and OpenAI's error fields (and headers such as Retry-After)."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]  # as the chat formats take them (finetune.models.chat)
    stream: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: Optional[int] = None
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None  # None also when tool_choice is "none"
    include_usage: bool = False  # stream_options.include_usage


def _invalid(param: str, message: str) -> APIError:
    return APIError(422, f"{param}: {message}", param=param, code="invalid_value")


def _number(body: dict[str, Any], key: str, low: float, high: float, *, integer: bool = False,
            open_low: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return None
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) \
            or (isinstance(value, float) and not math.isfinite(value)) or value < low \
            or value > high or (open_low and value == low):
        what = "an integer" if integer else "a number"
        raise _invalid(key, f"must be {what} in {'(' if open_low else '['}{low:g}, {high:g}]")
    return value


def _message(n: int, m: Any) -> dict[str, Any]:
    where = f"messages.{n}"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise _invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, f"{where}.content: only text content parts are supported", param="messages")
        content = "".join(p["text"] for p in content)
    elif content is not None and not isinstance(content, str):
        raise _invalid(f"{where}.content", "must be a string, a list of text parts or null")
    if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
        raise _invalid(f"{where}.tool_calls", "must be a list")
    message = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
    return {**message, "tool_calls": m["tool_calls"]} if m.get("tool_calls") else message


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 overflows to inf
        raise ValueError(f"{text[:20]} is not a finite JSON number")
    return value


def read_json(raw: bytes) -> Any:
    """The body as JSON; NaN, Infinity and numbers that overflow to infinity refused (APIError 400)."""
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        reason = str(exc) if "JSON number" in str(exc) else "not valid JSON"
        raise APIError(400, f"the request body is not valid JSON: {reason}"[:200], code="invalid_json") from None


def _stops(body: dict[str, Any], limits: Limits) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _invalid("stop", "must be a string or a list of strings")
    if stop and len(stop) > limits.max_stop:
        raise _invalid("stop", f"at most {limits.max_stop} stop sequences, got {len(stop)}")
    if stop and max(map(len, stop)) > limits.max_stop_chars:
        raise _invalid("stop", f"a stop sequence may have at most {limits.max_stop_chars} characters")
    return tuple(stop or ())


def parse(body: Any, limits: Limits = Limits()) -> ChatRequest:
    """A checked request; APIError 422 naming the first field that is wrong or beyond `limits`."""
    if not isinstance(body, dict):
        raise _invalid("body", "must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise _invalid("model", "is required: a model id from GET /v1/models")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty list of messages")
    if len(messages) > limits.max_messages:
        raise _invalid("messages", f"at most {limits.max_messages} messages per request, got {len(messages)}")
    stop = _stops(body, limits)
    tools, options = body.get("tools"), body.get("stream_options") or {}
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise _invalid("tools", "must be a list of tool objects")
    if not isinstance(body.get("stream", False), bool) or not isinstance(options, dict):
        raise _invalid("stream", "must be true or false (stream_options an object)")
    temperature, top_p = _number(body, "temperature", 0, 2), _number(body, "top_p", 0, 1, open_low=True)
    return ChatRequest(
        model=body["model"], messages=[_message(n, m) for n, m in enumerate(messages)],
        stream=body.get("stream", False), temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        max_tokens=_number(body, "max_completion_tokens", 1, 2**31, integer=True)
        or _number(body, "max_tokens", 1, 2**31, integer=True),
        stop=stop, n=_number(body, "n", 1, 2**31, integer=True) or 1,
        seed=_number(body, "seed", -2**63, 2**63, integer=True),
        tools=None if body.get("tool_choice") == "none" else tools or None,
        include_usage=bool(options.get("include_usage")))


def sampling(req: ChatRequest, cap: int) -> Sampling:
    """The request's sampling; max_tokens is `cap` when not given and never more (a longer answer ends as
    "length", as one reaching the model's context does)."""
    return Sampling(temperature=req.temperature, top_p=req.top_p, max_tokens=min(req.max_tokens or cap, cap),
                    stop=req.stop, seed=req.seed)


def usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def finish_reason(done: Completion) -> str:
    return "stop" if done.finish_reason == "cancelled" else done.finish_reason
