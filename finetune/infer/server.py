"""`finetune serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, SSE streaming) for a run or a model.

    GET  /v1/models               the served models: the run (or model) and each adapter, by name
    POST /v1/chat/completions     stream true/false, temperature, top_p, max_tokens, stop, seed, n=1, tools
    GET  /health                  {"status": "ok", ...}, without a key (for probes)

FastAPI, uvicorn and sse-starlette are the `serve` extra, imported when a server is made (`require` says what to
install), so the package imports with its core dependencies alone. (No `from __future__ import annotations` here:
FastAPI reads the endpoints' annotations, and `Request` is imported inside create_app.)

One generation at a time: every request's work runs on ONE worker thread (a single-thread executor is the queue),
so concurrent requests wait their turn instead of racing on the model, its adapters or the tokenizer, and the
event loop stays free to accept, authenticate and reject. Because one request could otherwise hold that worker for
everyone, each is bounded (protocol.Limits: body, messages, stop strings, max_tokens, a time limit) and so is the
queue (a 429 with Retry-After when full); a request whose client goes away, streaming or not, is cancelled at the
next token (or skipped if it was still waiting). Bound to loopback without a key, the server answers only requests
addressed to a loopback name (a web page cannot read its answers through DNS rebinding); and a body must be
`application/json` (a cross-site form may post text/plain without asking; JSON needs a CORS preflight, which this
server never grants).
Every error is OpenAI-shaped JSON ({"error": {"message", "type", "param", "code"}}): 400 a request the model
cannot answer (n>1, a conversation the chat format refuses, a full context), 401 a missing or wrong key, 404 an
unknown model or route, 413 a body over the limit, 415 a body that is not JSON, 422 a field that is wrong or over
its limit, 429 a full queue; a bug is a 500 saying only that (its traceback goes to the server's log), and the
server keeps serving.
"""

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Optional

from finetune import hosts
from finetune.errors import UserError
from finetune.infer import load, memory
from finetune.infer.generate import Completion, Engine
from finetune.infer.options import ServeOptions
from finetune.infer.protocol import APIError, Limits, finish_reason, parse, read_json, sampling, usage

if TYPE_CHECKING:
    from fastapi import FastAPI
    from rich.console import Console

log = logging.getLogger("finetune.serve")


class Worker:
    """The single generation thread, the requests admitted to it (running or waiting) and their cancel flags."""

    def __init__(self, queue: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.active: set[threading.Event] = set()
        self.queue, self.admitted = queue, 0
        self.cancelled = 0  # answers stopped early because their client left
        self.refused = 0  # requests turned away because the queue was full

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args, **kwargs))

    def admit(self) -> None:
        """Count one more request in, or refuse it: a full queue is a 429 the client may retry later."""
        if self.admitted >= self.queue:
            self.refused += 1
            raise APIError(429, f"the server is busy ({self.admitted} requests queued); retry later",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.admitted += 1

    def release(self) -> None:
        self.admitted -= 1

    def shutdown(self) -> None:
        for cancel in list(self.active):
            cancel.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


RETRY_AFTER_S = 5


class Ticket:
    """One admitted request's cancel flag: set when its client leaves or its time is up (then it ends as
    "length", as an answer cut by max_tokens does)."""

    def __init__(self, worker: Worker, timeout_s: float) -> None:
        worker.admit()
        self.worker, self.cancel, self.timed_out = worker, threading.Event(), False
        self.timer = asyncio.get_running_loop().call_later(timeout_s, self._expire)

    def _expire(self) -> None:
        self.timed_out = True
        self.cancel.set()

    def close(self) -> None:
        if not self.timer.cancelled():
            self.timer.cancel()
            self.cancel.set()
            self.worker.release()

    def outcome(self, done: Completion) -> Completion:
        if self.timed_out and done.finish_reason == "cancelled":
            done.finish_reason = "length"
        return done


def require() -> None:
    """FastAPI, uvicorn and sse-starlette, or one clear error saying how to get them."""
    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"`finetune serve` needs FastAPI, uvicorn and sse-starlette ({exc}); "
                        f"pip install 'finetune[serve]'") from None


def create_app(engine: Engine, *, api_key: Optional[str] = None, limits: Limits = Limits(),
               local_only: bool = False) -> "FastAPI":
    """The app; `local_only` (bound to loopback without a key): requests must name a loopback Host."""
    require()
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException

    def reply(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), error.status, headers=error.headers)

    worker = Worker(limits.queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(title="finetune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    created = int(time.time())

    if local_only:
        app.add_middleware(LoopbackHost)

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <api_key>`",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return reply(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return reply(APIError(exc.status_code, str(exc.detail), kind=kind))

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception) -> JSONResponse:  # Starlette re-raises it: uvicorn logs the traceback
        return reply(INTERNAL)

    def _model(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "finetune"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": engine.models, "in_flight": len(worker.active),
                "queued": worker.admitted, "cancelled": worker.cancelled, "refused": worker.refused}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model(name) for name in engine.models]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorized)])
    async def model(name: str) -> dict[str, Any]:
        _check_model(engine, name)
        return _model(name)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)], response_model=None)
    async def chat_completions(request: Request) -> Any:
        req = parse(read_json(await _body(request, limits.max_body_bytes)), limits)
        _check_model(engine, req.model)
        if req.n != 1:
            raise APIError(400, "n > 1 is not supported: one answer per request", param="n")
        tools = req.tools
        if tools and not engine.supports_tools:
            raise APIError(400, f"the {engine.template} chat format has no tool calls", param="tools")
        ticket = Ticket(worker, limits.request_timeout_s)
        watch = asyncio.ensure_future(_until_disconnect(request, ticket.cancel))
        try:
            try:  # on the worker: the tokenizer is never used by two threads at once
                prompt = await worker.call(engine.prompt_ids, req.messages, tools)
                engine.room(prompt)
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages") from None
        except BaseException:
            watch.cancel()
            ticket.close()
            raise
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        run = partial(engine.generate, prompt, sampling(req, limits.max_tokens), model=req.model, tools=bool(tools))
        deltas: Optional[asyncio.Queue] = asyncio.Queue() if req.stream else None
        job = asyncio.ensure_future(_generate(worker, run, ticket, deltas))
        job.add_done_callback(lambda _: ticket.close())  # the worker is done with it, whoever is still listening
        if deltas is not None:
            watch.cancel()  # sse-starlette watches the stream's client itself
            return EventSourceResponse(_stream(job, deltas, ticket, head, req.include_usage))
        try:
            done = await job
        finally:
            watch.cancel()
        message: dict[str, Any] = {"role": "assistant", "content": done.text}
        if done.tool_calls:
            message.update(content=done.text or None, tool_calls=done.tool_calls)
        choice = {"index": 0, "message": message, "finish_reason": finish_reason(done), "logprobs": None}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(done)}

    return app


INTERNAL = APIError(500, "internal error; the server's log has the details", kind="server_error")
"""What a client learns of a bug: that it happened (exception types and messages stay in the log)."""


async def _body(request: Any, limit: int) -> bytes:
    """The body, read no further than `limit` bytes: 415 unless it is JSON, 413 when it is larger."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"the body must be JSON sent as Content-Type: application/json (got '{kind or 'none'}')",
                       code="unsupported_media_type")
    too_large = APIError(413, f"the request body is over {limit:,} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(request: Any, cancel: threading.Event) -> None:
    """Set `cancel` when the client goes away. Once the body is read, the next ASGI message a server sends is the
    disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


def _check_model(engine: Engine, name: str) -> None:
    if name not in engine.models:
        raise APIError(404, f"The model '{name}' does not exist; served: {', '.join(engine.models)}",
                       kind="not_found_error", param="model", code="model_not_found")


async def _generate(worker: Worker, run: Any, ticket: Ticket, deltas: Optional[asyncio.Queue] = None
                    ) -> Completion:
    """`run` on the worker, counted in flight until it returns, its text sent to `deltas` as it comes (then None);
    the format's refusals become 400s."""
    loop = asyncio.get_running_loop()
    on_text = None if deltas is None else lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d)
    worker.active.add(ticket.cancel)
    try:
        done = ticket.outcome(await worker.call(run, cancel=ticket.cancel, on_text=on_text))
        worker.cancelled += done.finish_reason == "cancelled"
        return done
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    finally:
        worker.active.discard(ticket.cancel)
        if deltas is not None:
            loop.call_soon_threadsafe(deltas.put_nowait, None)  # after every delta the worker queued


async def _stream(job: "asyncio.Future[Completion]", deltas: asyncio.Queue, ticket: Ticket, head: dict[str, Any],
                  with_usage: bool):
    """SSE events: the role, content deltas as the worker makes them, tool calls, the finish, usage, [DONE]."""

    def chunk(delta: dict[str, Any], finish: Optional[str] = None, **extra: Any) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        return json.dumps({**head, "object": "chat.completion.chunk", "choices": choices, **extra},
                          ensure_ascii=False)

    try:
        yield {"data": chunk({"role": "assistant", "content": ""})}
        while (delta := await deltas.get()) is not None:
            yield {"data": chunk({"content": delta})}
        try:
            done = await job
        except Exception as exc:  # the status line went out with the first chunk: the error is an event
            if not isinstance(exc, APIError):
                log.exception("internal error while streaming")
            yield {"data": json.dumps((exc if isinstance(exc, APIError) else INTERNAL).body())}
            return
        if done.tool_calls:
            yield {"data": chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(done.tool_calls)]})}
        yield {"data": chunk({}, finish_reason(done))}
        if with_usage:
            yield {"data": json.dumps({**head, "object": "chat.completion.chunk", "choices": [],
                                       "usage": usage(done)})}
        yield {"data": "[DONE]"}
    finally:
        ticket.cancel.set()  # the client left (or all is sent): a running answer stops at its next token


class LoopbackHost:
    """ASGI middleware: requests must be addressed to a loopback name. A page on another site that makes its own
    name resolve to 127.0.0.1 (DNS rebinding) still sends its own name as Host, and is refused."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            host = hosts.header_host(given)
            if host is None or not hosts.is_loopback(host):
                from fastapi.responses import JSONResponse

                error = APIError(400, "unexpected Host header: without an api_key this server answers requests "
                                      "addressed to 127.0.0.1 / localhost only", code="invalid_host")
                await JSONResponse(error.body(), error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def run(options: ServeOptions, err: "Console") -> int:
    """Load what `options` name, then serve it until Ctrl-C / SIGTERM (uvicorn finishes what is running)."""
    require()  # before minutes of loading
    import uvicorn

    api_key = options.api_key or os.environ.get("FINETUNE_API_KEY") or None
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    with socket.socket(family) as probe:  # a busy port is said now, not after minutes of loading
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((options.host, options.port))
        except OSError as exc:
            raise UserError(f"cannot listen on {options.host}:{options.port} ({exc.strerror}); pass another "
                            f"port=") from None
    source = load.resolve(options)
    err.print(memory.describe(source, options), markup=False)
    from finetune.infer import backends  # (torch: only after the checks above, which need none)

    engine = backends.load(source, options)
    limits = Limits(**{f.name: getattr(options, f.name) for f in dataclasses.fields(Limits)})
    app = create_app(engine, api_key=api_key, limits=limits,
                     local_only=api_key is None and hosts.is_loopback(options.host))
    key = "a Bearer key required" if api_key else "no api_key: anyone who can reach it may use it"
    err.print(f"serving {', '.join(engine.models)} at http://{options.host}:{options.port}/v1 "
              f"(OpenAI-compatible; {key}); Ctrl-C stops", markup=False)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning", access_log=False)
    return 0
