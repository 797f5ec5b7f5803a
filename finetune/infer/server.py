"""`finetune serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, SSE streaming) for a run or a model.

    GET  /v1/models               the served models: the run (or model) and each adapter, by name
    POST /v1/chat/completions     stream true/false, temperature, top_p, max_tokens, stop, seed, n=1, tools
    GET  /health                  {"status": "ok", ...}, without a key (for probes)

FastAPI, uvicorn and sse-starlette are the `serve` extra, imported when a server is made (`require` says what to
install), so the package imports with its core dependencies alone. (No `from __future__ import annotations` here:
FastAPI reads the endpoints' annotations, and `Request` is imported inside create_app.)

One generation at a time: every request's work runs on ONE worker thread (a single-thread executor is the queue),
so concurrent requests wait their turn instead of racing on the model, its adapters or the tokenizer, and the
event loop stays free to accept, authenticate and reject. A streamed request whose client goes away is cancelled
at the next token. Every error is OpenAI-shaped JSON ({"error": {"message", "type", "param", "code"}}):
400 a request the model cannot answer (n>1, a conversation the chat format refuses, a full context), 401 a
missing or wrong key, 404 an unknown model or route, 422 a body that does not match the schema; a bug is a
500 with one line, logged with its traceback on stderr, and the server keeps serving.
"""

import asyncio
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

from finetune.errors import UserError
from finetune.infer import load, memory
from finetune.infer.generate import Completion, Engine
from finetune.infer.options import ServeOptions
from finetune.infer.protocol import APIError, finish_reason, parse, sampling, usage

if TYPE_CHECKING:
    from fastapi import FastAPI
    from rich.console import Console

log = logging.getLogger("finetune.serve")


class Worker:
    """The single generation thread, and the cancel flags of what runs or waits on it."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.active: set[threading.Event] = set()
        self.cancelled = 0  # answers stopped early because their client left

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        for cancel in list(self.active):
            cancel.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


def require() -> None:
    """FastAPI, uvicorn and sse-starlette, or one clear error saying how to get them."""
    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"`finetune serve` needs FastAPI, uvicorn and sse-starlette ({exc}); "
                        f"pip install 'finetune[serve]'") from None


def create_app(engine: Engine, *, api_key: Optional[str] = None, max_tokens: int = 512) -> "FastAPI":
    require()
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException

    def reply(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), error.status)

    worker = Worker()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(title="finetune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    created = int(time.time())

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
    async def bug(_: Request, exc: Exception) -> JSONResponse:  # uvicorn logs the traceback on stderr
        return reply(APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    def _model(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "finetune"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": engine.models, "in_flight": len(worker.active),
                "cancelled": worker.cancelled}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model(name) for name in engine.models]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorized)])
    async def model(name: str) -> dict[str, Any]:
        _check_model(engine, name)
        return _model(name)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)], response_model=None)
    async def chat_completions(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        req = parse(body)
        _check_model(engine, req.model)
        if req.n != 1:
            raise APIError(400, "n > 1 is not supported: one answer per request", param="n")
        tools = req.tools
        if tools and not engine.supports_tools:
            raise APIError(400, f"the {engine.template} chat format has no tool calls", param="tools")
        try:  # on the worker: the tokenizer is never used by two threads at once
            prompt = await worker.call(engine.prompt_ids, req.messages, tools)
            engine.room(prompt)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        run = partial(engine.generate, prompt, sampling(req, max_tokens), model=req.model, tools=bool(tools))
        if req.stream:
            return EventSourceResponse(_stream(worker, run, head, req.include_usage))
        done = await _generate(worker, run)
        message: dict[str, Any] = {"role": "assistant", "content": done.text}
        if done.tool_calls:
            message.update(content=done.text or None, tool_calls=done.tool_calls)
        choice = {"index": 0, "message": message, "finish_reason": finish_reason(done), "logprobs": None}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(done)}

    return app


def _check_model(engine: Engine, name: str) -> None:
    if name not in engine.models:
        raise APIError(404, f"The model '{name}' does not exist; served: {', '.join(engine.models)}",
                       kind="not_found_error", param="model", code="model_not_found")


async def _generate(worker: Worker, run: Any, cancel: Optional[threading.Event] = None, **kwargs: Any
                    ) -> Completion:
    """`run` on the worker, counted in flight until it returns; the format's refusals become 400s."""
    cancel = cancel or threading.Event()
    worker.active.add(cancel)
    try:
        done = await worker.call(run, cancel=cancel, **kwargs)
        worker.cancelled += done.finish_reason == "cancelled"
        return done
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    finally:
        worker.active.discard(cancel)


async def _stream(worker: Worker, run: Any, head: dict[str, Any], with_usage: bool):
    """SSE events: the role, content deltas as the worker makes them, tool calls, the finish, usage, [DONE]."""
    loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

    def chunk(delta: dict[str, Any], finish: Optional[str] = None, **extra: Any) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        return json.dumps({**head, "object": "chat.completion.chunk", "choices": choices, **extra},
                          ensure_ascii=False)

    job = asyncio.ensure_future(_generate(worker, run, cancel, on_text=lambda d: loop.call_soon_threadsafe(
        queue.put_nowait, d)))
    job.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        yield {"data": chunk({"role": "assistant", "content": ""})}
        while (delta := await queue.get()) is not None:
            yield {"data": chunk({"content": delta})}
        try:
            done = job.result()
        except Exception as exc:  # the status line went out with the first chunk: the error is an event
            error = exc if isinstance(exc, APIError) else APIError(500, f"internal error: {exc}", kind="server_error")
            if not isinstance(exc, APIError):
                log.exception("internal error while streaming")
            yield {"data": json.dumps(error.body())}
            return
        if done.tool_calls:
            yield {"data": chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(done.tool_calls)]})}
        yield {"data": chunk({}, finish_reason(done))}
        if with_usage:
            yield {"data": json.dumps({**head, "object": "chat.completion.chunk", "choices": [],
                                       "usage": usage(done)})}
        yield {"data": "[DONE]"}
    finally:
        cancel.set()  # the client left (or all is sent): a running answer stops at its next token


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
    engine = load.load(source, options)
    app = create_app(engine, api_key=api_key, max_tokens=options.max_tokens)
    key = "a Bearer key required" if api_key else "no api_key: anyone who can reach it may use it"
    err.print(f"serving {', '.join(engine.models)} at http://{options.host}:{options.port}/v1 "
              f"(OpenAI-compatible; {key}); Ctrl-C stops", markup=False)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning", access_log=False)
    return 0
