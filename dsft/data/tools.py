"""Tool calling in records: the declared tools and the assistant's calls, validated.

Two layouts are read. OpenAI's (and DeepSeek's API): a record's `tools` is a list of
{"type": "function", "function": {"name", "description", "parameters"}} (the bare function object
is accepted too), an assistant message's `tool_calls` a list of {"type": "function", "function":
{"name", "arguments"}} with arguments a JSON string (or an object), and a `tool` message holds a
result. LLaMA-Factory's sharegpt: `tools` is that list as a JSON string, a `function_call` turn's
value is one call {"name", "arguments"} (or a list of them) as JSON, an `observation` turn a result.

Every call must name a declared tool and carry JSON-object arguments; errors name the record's
source and field. Arguments given as a JSON string are kept as written (a template renders that
string); an object is written as json.dumps writes it, non-ASCII kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dsft.data.read import RawRecord, json_type
from dsft.errors import DsftError


@dataclass(frozen=True)
class ToolCall:
    """One call an assistant turn makes."""

    name: str
    arguments: str
    """The arguments as JSON text of an object."""


@dataclass(frozen=True)
class Tool:
    """A declared tool: its JSON schema as the record gave it, and its name."""

    name: str
    schema: dict
    """The function object: name, optional description and parameters (a JSON schema)."""


def field_error(record: RawRecord, path: str, problem: str) -> DsftError:
    return DsftError(f"{record.source}: field '{path}': {problem}")


def read_tools(record: RawRecord) -> tuple[Tool, ...]:
    """The record's declared tools (its `tools` field: a list, or LLaMA-Factory's JSON string of one); () without."""
    value = record.data.get("tools")
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        value = _json(record, "tools", value)
    if not isinstance(value, list):
        raise field_error(record, "tools", f"expected a list of tool schemas, got {json_type(value)}")
    tools = [_tool(record, f"tools[{i}]", entry) for i, entry in enumerate(value)]
    names = [tool.name for tool in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise field_error(record, f"tools[{i}].name", f"tool {name!r} is declared twice")
    return tuple(tools)


def _tool(record: RawRecord, path: str, entry) -> Tool:
    if not isinstance(entry, dict):
        raise field_error(record, path, f"expected a tool schema object, got {json_type(entry)}")
    if "function" in entry:  # OpenAI's {"type": "function", "function": {...}}
        if entry.get("type", "function") != "function":
            raise field_error(record, f"{path}.type", "only function tools are supported")
        entry, path = entry["function"], f"{path}.function"
        if not isinstance(entry, dict):
            raise field_error(record, path, f"expected an object, got {json_type(entry)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise field_error(record, f"{path}.name", "a tool needs a name (a non-empty string)")
    parameters = entry.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise field_error(record, f"{path}.parameters", f"expected a JSON schema object, got {json_type(parameters)}")
    return Tool(name, entry)


def openai_calls(record: RawRecord, path: str, value, tools: tuple[Tool, ...]) -> tuple[ToolCall, ...]:
    """An assistant message's tool_calls (OpenAI's shape), validated against the declared tools."""
    if not isinstance(value, list) or not value:
        raise field_error(record, path, f"expected a non-empty list of tool calls, got {json_type(value)}")
    calls = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("function"), dict):
            raise field_error(record, f"{path}[{i}]", 'expected {"type": "function", "function": {name, arguments}}')
        if entry.get("type", "function") != "function":
            raise field_error(record, f"{path}[{i}].type", "only function calls are supported")
        calls.append(_call(record, f"{path}[{i}].function", entry["function"], tools))
    return tuple(calls)


def sharegpt_calls(record: RawRecord, path: str, value: str, tools: tuple[Tool, ...]) -> tuple[ToolCall, ...]:
    """A LLaMA-Factory function_call turn's value: one call, or a list of calls, as JSON."""
    parsed = _json(record, path, value)
    entries = parsed if isinstance(parsed, list) else [parsed]
    if not entries:
        raise field_error(record, path, "expected a tool call, got an empty list")
    return tuple(_call(record, f"{path}[{i}]" if isinstance(parsed, list) else path, entry, tools)
                 for i, entry in enumerate(entries))


def _call(record: RawRecord, path: str, entry, tools: tuple[Tool, ...]) -> ToolCall:
    if not isinstance(entry, dict):
        raise field_error(record, path, f'expected a call {{"name", "arguments"}}, got {json_type(entry)}')
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise field_error(record, f"{path}.name", "a call needs the name of a declared tool")
    declared = [tool.name for tool in tools]
    if name not in declared:
        allowed = ", ".join(declared) if declared else "none: the record has no tools field"
        raise field_error(record, f"{path}.name", f"calls {name!r}, which is not a declared tool ({allowed})")
    arguments = entry.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    parsed = _json(record, f"{path}.arguments", text) if isinstance(arguments, str) else arguments
    if not isinstance(parsed, dict):
        raise field_error(record, f"{path}.arguments", f"expected a JSON object, got {json_type(parsed)}")
    return ToolCall(name, text)


def _json(record: RawRecord, path: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise field_error(record, path, f"not valid JSON ({exc.msg} at character {exc.pos})") from None


def tools_as_openai(tools: tuple[Tool, ...]) -> list[dict]:
    """The declared tools as OpenAI's tools list (what a tokenizer's own template reads)."""
    return [{"type": "function", "function": tool.schema} for tool in tools]
