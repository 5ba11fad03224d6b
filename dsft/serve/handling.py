"""How `dsft serve` handles one request: authorize, read, parse, resolve the model, render the prompt, generate
(through the engine's queue, or from the cache), account. The routes in server.py only shape the responses.

Chat prompts are rendered by the served run's own chat template through the very
functions that rendered its training data; a reasoning model's <think> text goes in reasoning_content, as in
DeepSeek's API.

Safety defaults: bind 127.0.0.1; with api_keys configured every route but /health needs `Authorization: Bearer KEY`
(compared in constant time, never logged); caps on the body, the prompt tokens and max_tokens; a request timeout;
prompts are not logged unless log_prompts; a model is only looked up by name among those loaded at startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from dsft.config.serve import ServeConfig
from dsft.errors import DsftError
from dsft.models.families import family_of, model_type_of
from dsft.serve.batcher import Job, JobRefused, QueueFull, Sampling
from dsft.serve.cache import CachedReply, ReplyCache
from dsft.serve.metrics import ServeMetrics
from dsft.serve.models import ServedModel, ServedModels
from dsft.serve.openai_schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    new_id,
    parse_request,
    usage,
)
from dsft.serve.release import Release
from dsft.serve.reply_text import ReplyText, prompt_opens_thinking
from dsft.serve.tool_calls import ToolUse, forced_opening, read_request

log = logging.getLogger("dsft.serve")

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
             "/v1/feedback": "feedback",
             "/health": "health", "/metrics": "metrics"}
"""Path -> endpoint label; any other path is labelled "other" (label values never come from a request)."""

MODEL_HEADER = "x-dsft-model"
"""Response header naming the served model that answered (a canary alias names the version it routed to)."""


def _thinking(parsed: ChatCompletionRequest, served: ServedModel) -> bool | None:
    """The request's chat_template_kwargs.thinking, else the run's; ApiError(400) for a mode its template lacks."""
    from dsft.data.chat import check_thinking

    kwargs = parsed.chat_template_kwargs
    if kwargs is None or kwargs.thinking is None:
        return served.thinking
    try:
        check_thinking(served.template, kwargs.thinking, "chat_template_kwargs.thinking")
    except DsftError as exc:
        raise ApiError(400, str(exc), "invalid_request", param="chat_template_kwargs.thinking") from None
    return kwargs.thinking


def _prompt_field(parsed) -> str:
    return "messages" if isinstance(parsed, ChatCompletionRequest) else "prompt"


GREEDY_BELOW_TEMPERATURE = 1e-4
"""A temperature under this samples the most likely token anyway, and dividing logits by it can overflow float32 to
inf (a 500 for the whole batch), so it is served as temperature 0: greedy, and cacheable."""


def sampling_of(parsed) -> Sampling:
    """The request's sampling settings; temperature defaults to 1, as OpenAI's does."""
    temperature = 1.0 if parsed.temperature is None else parsed.temperature
    if temperature < GREEDY_BELOW_TEMPERATURE:
        return Sampling()  # greedy, where top_p plays no part: one batch group for every greedy request
    return Sampling(temperature, 1.0 if parsed.top_p is None else parsed.top_p)


@dataclass
class Call:
    """One generation request, parsed and resolved."""

    request_id: str
    endpoint: str
    requested: str
    served: ServedModel
    prompt_ids: list[int]
    opens_thinking: bool
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    stream: bool
    include_usage: bool
    started_s: float
    prompt_text: str = ""
    finish_reason: str = "stop"
    completion_tokens: int = 0
    first_token_s: float | None = None
    last_token_s: float | None = None
    cache_hit: bool = False
    text: list[str] = field(default_factory=list)
    tool_use: ToolUse | None = None
    """A chat request's tools (None: a completion); its reply's calls are parsed when tools are offered."""
    shadow: tuple | None = None
    """(candidate, prompt ids, prompt text) when serve.shadow picked this request (release.py)."""


class App:
    """The state behind the routes: served models, engine, cache, metrics, settings."""

    def __init__(self, served: ServedModels, config: ServeConfig, engine, metrics: ServeMetrics):
        self.served, self.config, self.engine, self.metrics = served, config, engine, metrics
        self.cache = ReplyCache(config.cache.max_entries)
        self.release = Release(self, served, config, metrics)
        self._keys = [key.get_secret_value().encode() for key in config.api_keys]
        self.created_s = int(time.time())
        self.context_tokens: int | None = getattr(served.model.config, "max_position_embeddings", None)
        # A model that must never see padding batches prompts of one length only (models/unpadded.py).
        self.one_length_batches = family_of(model_type_of(served.model)).padding_blocker is not None
        """The model's context window (prompt plus reply), when its config names one."""

    # -- requests in ----------------------------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        """Raise ApiError(401) unless keys are off or the bearer token equals one of them (constant time)."""
        if not self._keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send Authorization: Bearer KEY", "auth", code="invalid_api_key")
        # Every key is compared, so the time taken does not tell which (or how many) keys came close.
        matches = [hmac.compare_digest(token.strip().encode(), key) for key in self._keys]
        if not any(matches):
            raise ApiError(401, "invalid API key", "auth", code="invalid_api_key")

    async def read_body(self, request: Request, deadline_s: float) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed max_body_bytes (never read whole), and with
        408 when it has not all arrived by deadline_s (a client trickling its body holds no request open)."""
        cap = self.config.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"request body over {cap} bytes", "body_too_large")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(max(0.0, deadline_s - time.perf_counter())):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > cap:
                        raise ApiError(413, f"request body over {cap} bytes", "body_too_large")
                    chunks.append(chunk)
        except TimeoutError:
            timeout_s = self.config.limits.request_timeout_s
            raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", "body_timeout",
                           code="timeout") from None
        return b"".join(chunks)

    def resolve(self, requested: str, request: Request) -> ServedModel:
        served = self.served.resolve(requested, self.release.route())
        if served is None:
            names = ", ".join(self.served.names())
            raise ApiError(404, f"model {requested!r} is not served; served models: {names}", "model_not_found",
                           param="model", code="model_not_found")
        request.state.served_model = served.name
        return served

    def _requested_label(self, requested: str) -> str:
        return requested if requested in self.served.names() else "-"

    def prompt(self, parsed, served: ServedModel) -> tuple[list[int], str, ToolUse | None]:
        """(token ids, text, tool use) of the prompt: chat messages (and tools) through the run's template, completion
        text as training rendered plain text; raises ApiError(400) for a conversation the template refuses or a
        prompt over the cap."""
        from dsft.data.chat import Segment, render_prompt, render_text
        from dsft.data.encode import encode_segments

        tokenizer, use = self.served.tokenizer, None
        try:
            if isinstance(parsed, ChatCompletionRequest):
                use = read_request(parsed, served.template)
                example = use.example
                segments = render_prompt(example.messages, served.template, tokenizer, _thinking(parsed, served),
                                         example.tools)
                if use.forced is not None:  # the reply begins inside the named function's call
                    segments.append(Segment(forced_opening(served.template, use.forced), False))
            else:
                segments = render_text(parsed.prompt, tokenizer)[:-1]  # [bos] + text: no end-of-sequence
            ids, _ = encode_segments(segments, tokenizer)
        except (DsftError, ValueError) as exc:
            param = _prompt_field(parsed)
            raise ApiError(400, f"{param}: {exc}", "invalid_request", param=param) from None
        cap = self.config.limits.max_prompt_tokens
        if len(ids) > cap:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; at most {cap} are allowed", "prompt_too_long",
                           param=_prompt_field(parsed), code="context_length_exceeded")
        return ids, "".join(segment.text for segment in segments), use

    def max_tokens(self, parsed) -> int:
        limits = self.config.limits
        requested, field_name = parsed.requested_max_tokens()
        if requested is None:
            return min(limits.default_max_tokens, limits.max_tokens)
        if requested > limits.max_tokens:
            raise ApiError(400, f"{field_name} is {requested}; at most {limits.max_tokens} are allowed",
                           "max_tokens_too_large", param=field_name)
        return requested

    def fit_context(self, parsed, prompt_tokens: int, max_tokens: int) -> int:
        """max_tokens within the model's context window: a default budget is cut to what is left after the
        prompt; a requested one that does not fit, or a prompt that leaves no room, is a 400."""
        context = self.context_tokens
        if context is None or prompt_tokens + max_tokens <= context:
            return max_tokens
        requested, field_name = parsed.requested_max_tokens()
        if requested is None and prompt_tokens < context:
            return context - prompt_tokens
        if requested is None:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens and leaves no room in the model's context of "
                                f"{context}", "context_length_exceeded", param=_prompt_field(parsed),
                           code="context_length_exceeded")
        raise ApiError(400, f"the model's context is {context} tokens and the prompt takes {prompt_tokens}: "
                            f"{field_name} {requested} does not fit (at most {max(0, context - prompt_tokens)})",
                       "context_length_exceeded", param=field_name, code="context_length_exceeded")

    async def call(self, request: Request, endpoint: str) -> Call:
        """Authorize, read, parse and resolve one generation request; every refusal is an ApiError (4xx)."""
        started_s = time.perf_counter()
        self.authorize(request)
        body = await self.read_body(request, started_s + self.config.limits.request_timeout_s)
        parsed = parse_request(body, ChatCompletionRequest if endpoint == "chat" else CompletionRequest)
        max_tokens = self.max_tokens(parsed)  # before a canary draws a version for a request it then refuses
        served = self.resolve(parsed.model, request)
        ids, prompt_text, tool_use = self.prompt(parsed, served)
        max_tokens = self.fit_context(parsed, len(ids), max_tokens)
        # Counted once the request is accepted, so a canary's split counts the requests each version answers.
        self.metrics.routed.labels(self._requested_label(parsed.model), served.name).inc()
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        call = Call(new_id(prefix), endpoint, parsed.model, served, ids, prompt_opens_thinking(prompt_text),
                    max_tokens, sampling_of(parsed), parsed.stop_strings(), bool(parsed.stream),
                    parsed.include_usage(), started_s, prompt_text, tool_use=tool_use)
        self.release.plan_shadow(self, parsed, call)
        return call

    # -- generation -----------------------------------------------------------------------------------------------

    def cache_key(self, call: Call) -> tuple | None:
        if not call.sampling.greedy or self.cache.max_entries == 0:
            return None
        return ReplyCache.key(call.served.name, call.prompt_ids, call.max_tokens, call.stop)

    def cached(self, call: Call) -> CachedReply | None:
        key = self.cache_key(call)
        if key is None:
            return None
        reply = self.cache.get(key)
        (self.metrics.cache_hits if reply is not None else self.metrics.cache_misses).inc()
        return reply

    def submit(self, call: Call, background: bool = False) -> tuple[Job, asyncio.Queue]:
        """Queue call's generation (a background job waits while client requests do: the shadow's); raises
        ApiError(503) when the queue is full."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(event: tuple) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(call.prompt_ids, call.max_tokens, call.sampling, call.served.name, deliver,
                  per_token=call.stream or bool(call.stop),
                  prompt_length=len(call.prompt_ids) if self.one_length_batches else None, background=background)
        try:
            self.engine.submit(job)
        except QueueFull:
            raise ApiError(503, "the server is overloaded; retry later", "queue_full",
                           code="server_overloaded") from None
        except JobRefused as exc:
            raise ApiError(400, str(exc), "unsupported", param="temperature") from None
        return job, events

    def start(self, call: Call) -> AsyncIterator[str]:
        """Begin call's reply: from the cache, or queued for the engine at once (so a full queue is a 503 before
        any response starts). Returns the reply's text pieces as they are released."""
        cached = self.cached(call)
        if cached is not None:
            call.cache_hit, call.finish_reason = True, cached.finish_reason
            call.completion_tokens = cached.completion_tokens
            return self._cached_pieces(call, cached.text)
        job, events = self.submit(call)
        return self.pieces(call, job, events)

    async def _cached_pieces(self, call: Call, text: str) -> AsyncIterator[str]:
        call.text.append(text)
        yield text

    async def pieces(self, call: Call, job: Job, events: asyncio.Queue) -> AsyncIterator[str]:
        """Fills call's finish reason, token counts and times; raises ApiError (504 on the request timeout, 500 when
        generation failed)."""
        text = ReplyText(self.served.tokenizer, call.stop)
        deadline_s = call.started_s + self.config.limits.request_timeout_s
        try:
            while True:
                kind, value = await self._next_event(events, deadline_s)
                if kind == "error":
                    raise ApiError(500, value, "generation")
                if kind == "end" and value == "cancelled":
                    # Only a stopping server cancels a job its client still waits for: never cache the cut reply.
                    raise ApiError(503, "the server is stopping; retry later", "cancelled", code="server_stopping")
                if kind == "end":
                    call.finish_reason = "length" if value == "length" else "stop"
                    break
                tokens = value if kind == "tokens" else [value]
                self._count_tokens(call, len(tokens))
                piece = text.extend(tokens)
                if piece:
                    call.text.append(piece)
                    yield piece
                if text.stopped:
                    # The reply is whole: tokens the engine made before it sees the cancellation are not counted.
                    call.finish_reason = "stop"
                    break
            if piece := text.finish():
                call.text.append(piece)
                yield piece
        finally:
            job.cancelled.set()  # no-op when it ended; frees the row when the client left or timed out
        self._remember(call)

    async def _next_event(self, events: asyncio.Queue, deadline_s: float) -> tuple:
        try:
            return await asyncio.wait_for(events.get(), max(0.0, deadline_s - time.perf_counter()))
        except TimeoutError:
            timeout_s = self.config.limits.request_timeout_s
            raise ApiError(504, f"the request did not finish within {timeout_s:g} s", "timeout",
                           code="timeout") from None

    def _count_tokens(self, call: Call, count: int) -> None:
        now_s = time.perf_counter()
        if call.first_token_s is None:
            call.first_token_s = now_s
            self.metrics.time_to_first_token.labels(call.served.name).observe(now_s - call.started_s)
        call.last_token_s = now_s
        call.completion_tokens += count

    def _remember(self, call: Call) -> None:
        key = self.cache_key(call)
        if key is not None and not call.cache_hit:
            self.cache.put(key, CachedReply("".join(call.text), call.finish_reason, call.completion_tokens))
            self.metrics.cache_entries.set(len(self.cache))

    # -- accounting -----------------------------------------------------------------------------------------------

    def finished(self, call: Call, status: int) -> None:
        """Metrics and the one log line of a generation request that was answered."""
        name, m = call.served.name, self.metrics
        m.requests.labels(call.endpoint, name, str(status)).inc()
        m.request_latency.labels(call.endpoint, name).observe(time.perf_counter() - call.started_s)
        m.prompt_tokens.labels(name).inc(len(call.prompt_ids))
        if not call.cache_hit:  # a cached reply generated nothing now
            m.generated_tokens.labels(name).inc(call.completion_tokens)
        if not call.cache_hit and call.completion_tokens >= 2 and call.last_token_s > call.first_token_s:
            m.tokens_per_second.labels(name).observe(
                (call.completion_tokens - 1) / (call.last_token_s - call.first_token_s))
        log.info("%s %s requested=%s served=%s status=%d prompt_tokens=%d completion_tokens=%d cache=%s "
                 "latency_ms=%.1f", call.request_id, call.endpoint, self._requested_label(call.requested), name,
                 status, len(call.prompt_ids), call.completion_tokens, "hit" if call.cache_hit else "miss",
                 (time.perf_counter() - call.started_s) * 1000)
        if self.config.log_prompts:
            log.info("%s prompt=%s reply=%s", call.request_id, json.dumps(call.prompt_text, ensure_ascii=False),
                     json.dumps("".join(call.text), ensure_ascii=False))
        self.release.finished(call, status)

    def headers(self, call: Call) -> dict:
        return {MODEL_HEADER: call.served.name, "x-request-id": call.request_id}

    def usage(self, call: Call) -> dict:
        return usage(len(call.prompt_ids), call.completion_tokens)

    def error_response(self, request: Request, error: ApiError) -> JSONResponse:
        endpoint = ENDPOINTS.get(request.url.path, "other")
        model = getattr(request.state, "served_model", "-")
        self.metrics.errors.labels(error.kind).inc()
        self.metrics.requests.labels(endpoint, model, str(error.status)).inc()
        if model != "-":
            self.release.failed(model, error.status)
        log.info("%s status=%d kind=%s", endpoint, error.status, error.kind)
        headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)
