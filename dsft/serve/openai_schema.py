"""The OpenAI API shapes `dsft serve` speaks: typed requests, response and stream-chunk bodies, error bodies.

Requests are validated strictly (a string is not a number) from the raw body, so malformed JSON, wrong types and
values out of range become one ApiError with an OpenAI-style body ({"error": {"message", "type", "param", "code"}})
and a 4xx status, never a 500. Fields dsft does not implement are refused by name rather than silently ignored;
unknown fields are ignored, as clients send new ones before servers know them.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ApiError(Exception):
    """An error answered with an OpenAI-style body; kind labels the errors metric."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        default_type = "invalid_request_error" if status < 500 else "server_error"
        self.error_type = error_type or ("authentication_error" if status == 401 else default_type)

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    """Only text parts: the served models read text."""
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str
    """JSON text of an object, as OpenAI's API sends it."""


class ToolCallPart(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # strict and others are passed through as schema fields
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None
    """A JSON schema; the template shows it to the model."""


class ToolSpec(_Request):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    """developer is OpenAI's newer name for system; tool holds one call's result."""
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    """An earlier assistant turn's reasoning, as DeepSeek's API returns it (the templates drop it, as in training)."""
    tool_calls: list[ToolCallPart] | None = None
    """An earlier assistant turn's calls."""
    tool_call_id: str | None = None
    """Which call a tool message answers (accepted; results are rendered in order)."""

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False
    """Send a last chunk with the token usage."""


UNSUPPORTED = ("functions", "function_call", "logprobs", "top_logprobs", "logit_bias", "echo", "suffix", "presence_penalty",
               "frequency_penalty")
"""Request fields dsft serve refuses when set (truthy), instead of answering as if they had been honoured."""


class _Generation(_Request):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    """0 is greedy (and cacheable); default 1, as OpenAI's."""
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    """null is false, as in OpenAI's API."""
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(1, ge=1, le=1)
    """One choice per request: batching serves many requests instead."""
    seed: int | None = None
    """Accepted and not honoured: a batch shares one random generator."""
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name in UNSUPPORTED:
                if data.get(name) not in (None, False, [], {}, 0, ""):
                    raise _Unsupported(name)
            best_of, response_format = data.get("best_of"), data.get("response_format")
            if best_of not in (None, 1):
                raise _Unsupported("best_of")
            if response_format not in (None, {"type": "text"}):
                raise _Unsupported("response_format")
        return data

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("at most 4 non-empty stop strings")
        return stops

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatTemplateKwargs(BaseModel):
    """Template variables a request may set (vLLM's and SGLang's chat_template_kwargs); any other is refused."""

    model_config = ConfigDict(strict=True, extra="forbid")
    thinking: bool | None = None
    """DeepSeek-V3.1/V3.2 thinking mode for this request; None: the run's data.thinking."""


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: ChatTemplateKwargs | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none"] | NamedToolChoice | None = None
    """auto (the default with tools), none (the tools are not offered), or one function the reply must call;
    required is not supported."""
    parallel_tool_calls: bool | None = None
    """Accepted: a reply may hold several calls either way."""
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; wins when both are given."""

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(the requested token budget, the field that asked for it)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_Generation):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if len(prompts) != 1:
            raise ValueError("exactly one prompt per request (batching serves many requests instead)")
        return prompts[0]

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(the requested token budget, the field that asked for it)."""
        return self.max_tokens, "max_tokens"


class _Unsupported(ValueError):
    def __init__(self, name: str):
        super().__init__(f"{name} is not supported by dsft serve")
        self.name = name


def parse_request(body: bytes, model: type[_Generation]) -> _Generation:
    """The typed request of a raw JSON body; raises ApiError(400) naming the offending field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _as_api_error(exc) from None


def _as_api_error(exc: ValidationError) -> ApiError:
    error = exc.errors(include_url=False)[0]
    cause = (error.get("ctx") or {}).get("error")
    if error["type"] == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {cause}", "invalid_json")
    if isinstance(cause, _Unsupported):
        return ApiError(400, str(cause), "unsupported", param=cause.name, code="unsupported_parameter")
    param = ".".join(str(part) for part in error["loc"] if not _is_type_tag(part)) or None
    where = f"{param}: " if param else "request body: "
    return ApiError(400, f"{where}{error['msg']}", "invalid_request", param=param)


def _is_type_tag(part) -> bool:
    """Whether a pydantic error location part names a union member ("str", "list[TextPart]"), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_message(reasoning: str | None, content: str, tool_calls: list[dict] | None = None) -> dict:
    """The reply message; with tool_calls, content is null when the reply is only calls, as OpenAI's."""
    message = {"role": "assistant", "content": content if content or not tool_calls else None}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_completion_body(request_id: str, model: str, message: dict, finish_reason: str, usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_}


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_body(request_id: str, model: str, text: str, finish_reason: str | None, usage_: dict | None) -> dict:
    """A text_completion body; a stream chunk is the same shape with usage None."""
    body = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def usage_chunk(request_id: str, model: str, usage_: dict, chat: bool) -> dict:
    """The last chunk of a stream with include_usage: no choices, the request's usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_}


def models_body(names: list[str], created_s: int) -> dict:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created_s, "owned_by": "dsft"} for name in names]}
