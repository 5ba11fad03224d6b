"""`dsft serve`: an HTTP server with the OpenAI API shape (FastAPI + uvicorn) in front of a batching engine.

Routes: POST /v1/chat/completions and /v1/completions (stream: true answers with server-sent events), POST
/v1/feedback (a user's score of a reply, release.py), GET /v1/models,
GET /health (no key needed) and GET /metrics (Prometheus text format). Every error is an OpenAI-style body
{"error": {"message", "type", "param", "code"}} with a 4xx status for anything a client sent; a 500 means a bug or a
failed generation, and the server goes on serving. Request handling is in handling.py; this module shapes the
responses, builds the app and runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsft.config.serve import ServeConfig, load_serve_config
from dsft.serve.handling import App, Call
from dsft.serve.metrics import ServeMetrics
from dsft.serve.models import ServedModels, load_served
from dsft.serve.openai_schema import (
    ApiError,
    chat_chunk,
    chat_completion_body,
    chat_message,
    completion_body,
    error_body,
    models_body,
    usage_chunk,
)
from dsft.serve.reply_text import ReasoningStream, split_reply
from dsft.serve.tool_calls import ToolCallStream, call_delta, forced_opening

log = logging.getLogger("dsft.serve")


def build_engine(served: ServedModels, config: ServeConfig, metrics: ServeMetrics):
    """The engine requests are submitted to: the PID-batched static engine, or transformers' continuous batching."""
    batching = config.batching
    if batching.engine == "continuous":
        from dsft.serve.continuous import ContinuousEngine

        tokens_per_request = config.limits.max_prompt_tokens + config.limits.max_tokens
        return ContinuousEngine(served, batching, metrics, tokens_per_request)
    from dsft.serve.batcher import Batcher
    from dsft.serve.engine import StaticEngine

    return Batcher(StaticEngine(served), batching, metrics)


def create_app(served: ServedModels, config: ServeConfig, metrics: ServeMetrics | None = None, engine=None) -> FastAPI:
    """The FastAPI app serving served with config; the engine (default: build_engine's; tests pass a stand-in with
    submit/start/stop/queue_depth) starts and stops with the app's lifespan."""
    metrics = metrics if metrics is not None else ServeMetrics()
    engine = engine if engine is not None else build_engine(served, config, metrics)
    state = App(served, config, engine, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.engine.start()
        state.release.start()
        yield
        await state.release.stop()
        state.engine.stop()

    # No generated docs routes: the surface is the OpenAI API and nothing else.
    app = FastAPI(title="dsft serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.dsft = state
    _add_error_handlers(app, state)
    _add_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: App) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queue_depth": state.engine.queue_depth()}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        state.authorize(request)
        state.engine.queue_depth()  # drops queued requests whose clients left, so the gauge is current
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        state.authorize(request)
        return models_body(state.served.names(), state.created_s)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        call = await state.call(request, "chat")
        pieces = state.start(call)
        if call.stream:
            return _event_stream(state, call, pieces, _chat_chunks(call, pieces))
        reasoning, answer = split_reply(await _joined(state, request, call, pieces), call.opens_thinking)
        stream = _tool_stream(call)
        answer, calls = (answer, None) if stream is None else _all_of(stream, answer)
        if calls:
            call.finish_reason = "tool_calls"
        body = chat_completion_body(call.request_id, call.served.name, chat_message(reasoning, answer, calls),
                                    call.finish_reason, state.usage(call))
        state.finished(call, 200)
        return JSONResponse(body, headers=state.headers(call))

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict:
        state.authorize(request)
        body = await state.read_body(request, time.perf_counter() + state.config.limits.request_timeout_s)
        return state.release.record_feedback(body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        call = await state.call(request, "completions")
        pieces = state.start(call)
        if call.stream:
            return _event_stream(state, call, pieces, _completion_chunks(call, pieces))
        body = completion_body(call.request_id, call.served.name, await _joined(state, request, call, pieces),
                               call.finish_reason, state.usage(call))
        state.finished(call, 200)
        return JSONResponse(body, headers=state.headers(call))


DISCONNECT_POLL_S = 0.25
"""How often a non-streamed request checks that its client is still connected while the reply generates."""
CLIENT_CLOSED_STATUS = 499
"""Logged and counted for a request whose client left before its reply (nginx's convention; nobody receives it)."""


class ClientLeft(Exception):
    """The client of a non-streamed request closed its connection before the reply was ready."""


async def _joined(state: App, request: Request, call: Call, pieces: AsyncIterator[str]) -> str:
    """The whole reply text. The server does not otherwise notice a non-streamed client that leaves (nothing is
    written until the end), so the connection is watched meanwhile: when it closes, the generation is cancelled
    (pieces' finally frees the batch row) and ClientLeft is raised."""
    joining = asyncio.ensure_future(_join(pieces))
    while not joining.done():
        await asyncio.wait([joining], timeout=DISCONNECT_POLL_S)
        if not joining.done() and await request.is_disconnected():
            joining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await joining
            state.metrics.errors.labels("client_disconnected").inc()
            state.finished(call, CLIENT_CLOSED_STATUS)
            raise ClientLeft
    return joining.result()


async def _join(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])


async def _chat_chunks(call: Call, pieces: AsyncIterator[str]) -> AsyncIterator[dict]:
    """Chat stream chunks: the role, then reasoning_content and content deltas, the parsed tool calls (with tools
    offered, text from the calls marker on is held until the end), then the finish reason."""
    rid, model = call.request_id, call.served.name
    yield chat_chunk(rid, model, {"role": "assistant", "content": ""})
    splitter, calls_stream = ReasoningStream(call.opens_thinking), _tool_stream(call)
    async for piece in pieces:
        reasoning, answer = splitter.feed(piece)
        for delta in _deltas(reasoning, answer if calls_stream is None else calls_stream.feed(answer)):
            yield chat_chunk(rid, model, delta)
    reasoning, answer = splitter.finish()
    answer, calls = (answer, None) if calls_stream is None else _all_of(calls_stream, answer)
    for delta in _deltas(reasoning, answer):
        yield chat_chunk(rid, model, delta)
    if calls:
        call.finish_reason = "tool_calls"
        yield chat_chunk(rid, model, call_delta(calls))
    yield chat_chunk(rid, model, {}, call.finish_reason)


def _tool_stream(call: Call) -> ToolCallStream | None:
    """The parser of call's reply for tool calls; None when the request offers no tools."""
    use = call.tool_use
    if use is None or not use.parses:
        return None
    template = call.served.template
    opening = forced_opening(template, use.forced) if use.forced is not None else ""
    return ToolCallStream(template, {tool.name for tool in use.example.tools}, opening)


def _all_of(stream: ToolCallStream, answer: str) -> tuple[str, list[dict] | None]:
    """(content, calls) of the rest of an answer fed to stream (all of it, for a reply that is not streamed)."""
    passed = stream.feed(answer)
    rest, calls = stream.finish()
    return passed + rest, calls


def _deltas(reasoning: str, answer: str) -> list[dict]:
    return [*([{"reasoning_content": reasoning}] if reasoning else []), *([{"content": answer}] if answer else [])]


async def _completion_chunks(call: Call, pieces: AsyncIterator[str]) -> AsyncIterator[dict]:
    async for piece in pieces:
        yield completion_body(call.request_id, call.served.name, piece, None, None)
    yield completion_body(call.request_id, call.served.name, "", call.finish_reason, None)


def _event_stream(state: App, call: Call, pieces, chunks) -> StreamingResponse:
    """Server-sent events of chunks, then the usage (if asked) and [DONE]. An error after the stream began cannot
    change the status any more: it is sent as an error event, as OpenAI's API does."""

    async def events() -> AsyncIterator[str]:
        status = CLIENT_CLOSED_STATUS  # until the reply is out: a client that leaves ends the stream at a yield
        try:
            try:
                async for chunk in chunks:
                    yield _sse(chunk)
                if call.include_usage:
                    yield _sse(usage_chunk(call.request_id, call.served.name, state.usage(call),
                                           call.endpoint == "chat"))
                status = 200
            except ApiError as error:
                status = error.status
                state.metrics.errors.labels(error.kind).inc()
                yield _sse(error.body())
            yield "data: [DONE]\n\n"
        finally:
            if status == CLIENT_CLOSED_STATUS:
                state.metrics.errors.labels("client_disconnected").inc()
            state.finished(call, status)
            await chunks.aclose()
            await pieces.aclose()  # a client that left cancels its generation (pieces' finally)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**state.headers(call), "cache-control": "no-cache"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _add_error_handlers(app: FastAPI, state: App) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return state.error_response(request, error)

    @app.exception_handler(ClientLeft)
    async def client_left(request: Request, error: ClientLeft) -> Response:
        return Response(status_code=CLIENT_CLOSED_STATUS)  # counted in _joined; nobody is there to read it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = {404: "route_not_found", 405: "method_not_allowed"}.get(error.status_code, "http")
        return state.error_response(request, ApiError(error.status_code, str(error.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return state.error_response(request, ApiError(400, "invalid request", "invalid_request"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        state.metrics.errors.labels("internal").inc()
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def run_server(target: str, config_file: Path | None, overrides: list[str], port: int | None) -> None:
    """`dsft serve`: load the config and the models, then serve until interrupted. Raises DsftError."""
    import uvicorn

    overrides = [*overrides, *([f"serve.port={port}"] if port is not None else [])]
    config = load_serve_config(config_file, overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    served = load_served(target, config)
    app = create_app(served, config)
    for entry in served.by_name.values():
        log.info("serving %s (%s)", entry.name, entry.source)
    if not _is_loopback(config.host) and not config.api_keys:
        log.warning("serve.host %s is reachable from the network and serve.api_keys is empty: anyone who can reach "
                    "it can use the model", config.host)
    # Our own one line per request replaces uvicorn's access log (which adds nothing and would double the lines).
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", access_log=False)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 120.0):
    """Run app with uvicorn in a background thread (tests, benchmarks); yields its base URL ("http://host:port").
    Port 0 binds a free port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="dsft-serve-uvicorn", daemon=True)
    thread.start()
    deadline_s = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline_s:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(30)
