"""Tool calling in `dsft serve`: a chat request's tools and tool_choice, and the calls parsed from a reply.

The request's conversation (tool calls and tool results included) and tools are validated as a training record
is (dsft.data.formats), so a call must name a declared tool and carry JSON arguments, and rendered by the run's
template. tool_choice none offers no tools; a named function is forced by writing the opening of its call after
the generation prompt, so the model writes only the arguments.

A reply's calls are read in the template's own tool format (dsft.data.deepseek_layouts). A reply whose calls do
not parse (an unknown tool, arguments that are not a JSON object) is returned as text with finish_reason stop,
never an error. With a tokenizer's own template (not a DeepSeek one) tools are offered but replies stay text:
dsft does not know that model's call format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsft.data.deepseek_layouts import LAYOUTS, arguments_object, read_calls
from dsft.data.formats import Example, to_example
from dsft.data.read import RawRecord
from dsft.data.tokenizer import CALLS_BEGIN
from dsft.errors import DsftError
from dsft.serve.openai_schema import ApiError, ChatCompletionRequest, new_id


@dataclass(frozen=True)
class ToolUse:
    """How a chat request uses tools."""

    example: Example
    """The validated conversation (messages and the offered tools)."""
    forced: str | None = None
    """The function tool_choice names: its call's opening is part of the prompt."""

    @property
    def parses(self) -> bool:
        return bool(self.example.tools)


def read_request(parsed: ChatCompletionRequest, template: str) -> ToolUse:
    """The request's messages and tools validated as a record; ApiError(400) naming the field otherwise."""
    messages = []
    for message in parsed.messages:
        entry = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
        if message.reasoning_content is not None:
            entry["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        messages.append(entry)
    choice = parsed.tool_choice
    offered = parsed.tools if parsed.tools and choice != "none" else []
    record = RawRecord({"messages": messages, "tools": [tool.model_dump(exclude_none=True) for tool in offered]},
                       "request")
    try:
        example = to_example(record, "messages", require_answer=False)
    except DsftError as exc:
        field = re.search(r"field '([a-z_]+)", str(exc))
        param = field.group(1) if field else "messages"
        raise ApiError(400, str(exc).removeprefix("request: "), "invalid_request", param=param) from None
    forced = None if choice in (None, "auto", "none") else choice.function.name
    if forced is not None and forced not in {tool.name for tool in example.tools}:
        raise ApiError(400, f"tool_choice names {forced!r}, which is not among the request's tools",
                       "invalid_request", param="tool_choice")
    if forced is not None and template not in LAYOUTS:
        raise ApiError(400, f"tool_choice by name needs a DeepSeek template; this model renders with {template}",
                       "invalid_request", param="tool_choice")
    return ToolUse(example, forced)


def forced_opening(template: str, name: str) -> str:
    """The text that opens a call of name in template's format, up to its arguments."""
    call = LAYOUTS[template].tools.call
    return CALLS_BEGIN + call[: call.index("{arguments}")].format(name=name)


def parse_calls(text: str, template: str, declared: set[str]) -> tuple[str, list[dict]] | None:
    """(content before the calls, OpenAI tool_calls) of a reply in template's format; None when the reply has no
    calls or they do not parse: a tool that is not declared, arguments that are not a JSON object."""
    found = read_calls(text, template)
    if found is None:
        return None
    content, calls = found
    if not all(name in declared and arguments_object(arguments) is not None for name, arguments in calls):
        return None
    return content, [{"id": new_id("call"), "type": "function", "function": {"name": name, "arguments": arguments}}
                     for name, arguments in calls]


class ToolCallStream:
    """A streamed answer with tools offered: text is passed on until the calls marker, then held until the end,
    when the calls are parsed (or, if they do not parse, released as text)."""

    def __init__(self, template: str, declared: set[str], opening: str = ""):
        self._template, self._declared = template, declared
        self._held = opening
        """Text not yet passed on: a forced call's opening, or what may be or follows the calls marker."""
        self._in_calls = bool(opening)

    def feed(self, text: str) -> str:
        """Take answer text; returns what can be passed on as content now."""
        self._held += text
        if self._in_calls or CALLS_BEGIN in self._held:
            self._in_calls = True
            before, marker, after = self._held.partition(CALLS_BEGIN)
            self._held = marker + after
            return before
        keep = next((n for n in range(len(CALLS_BEGIN) - 1, 0, -1) if self._held.endswith(CALLS_BEGIN[:n])), 0)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
        return out

    def finish(self) -> tuple[str, list[dict] | None]:
        """(remaining content, the parsed calls or None)."""
        parsed = parse_calls(self._held, self._template, self._declared) if self._in_calls else None
        if parsed is None:
            return self._held, None
        return parsed


def call_delta(calls: list[dict]) -> dict:
    """The stream delta of parsed calls, each with its index, as OpenAI streams them."""
    return {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}

