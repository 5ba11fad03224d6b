"""Validate raw records of the four data formats into one normalized `Example`.

Every error names the record's source and the field path ("data/train.jsonl:7: field
'messages[2].role': ...") so the user can go straight to the line to fix. Errors never quote
a record's values: they go to the log and summary.json, and records may hold private data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from dsft.data.read import RawRecord, json_type
from dsft.data.tokenizer import THINK_CLOSE, THINK_OPEN
from dsft.data.tools import Tool, ToolCall, openai_calls, read_tools, sharegpt_calls
from dsft.errors import DsftError

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")
FORMATS = ("alpaca", "messages", "sharegpt", "text")

# The key that identifies each format, checked in this order, and the keys it reads.
_FORMAT_KEYS = {
    "messages": "messages",
    "sharegpt": "conversations",
    "alpaca": "instruction",
    "text": "text",
}
_FORMAT_FIELDS = {
    "alpaca": "instruction, output",
    "messages": "messages",
    "sharegpt": "conversations",
    "text": "text",
}
_SHAREGPT_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",  # LLaMA-Factory: the assistant's tool calls, as JSON
    "observation": "tool",  # LLaMA-Factory: a tool's result
}
_INLINE_REASONING = re.compile(rf"\s*{re.escape(THINK_OPEN)}(.*?){re.escape(THINK_CLOSE)}", re.DOTALL)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Role
    content: str
    """The visible text; for an assistant turn, the answer without its reasoning."""
    reasoning: str | None = None
    """Chain of thought of an assistant turn (stripped of surrounding whitespace), if any."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The tools an assistant turn calls (after its content); a tool message's content is one call's result."""


@dataclass(frozen=True)
class Example:
    """A validated record: a conversation (chat formats) or a plain text (format text)."""

    source: str
    """Where the record came from (RawRecord.source)."""
    messages: tuple[Message, ...] = ()
    """Chat formats: optional system message first, ending with the assistant turn to train on
    (or, read with require_answer=False, possibly with the user turn to answer)."""
    text: str | None = None
    """Format text (continued pre-training): the document."""
    thinking: bool | None = None
    """The record's own thinking mode (its thinking field), overriding data.thinking; None: not given."""
    tools: tuple[Tool, ...] = ()
    """The tools the conversation may call (its tools field)."""


def detect_format(record: RawRecord) -> str:
    """The format of a record, from its keys; raises DsftError naming the keys found and those expected."""
    for fmt, key in _FORMAT_KEYS.items():
        if key in record.data:
            return fmt
    found = ", ".join(map(str, record.data)) or "none"
    expected = "; ".join(f"{fmt} ({fields})" for fmt, fields in _FORMAT_FIELDS.items())
    raise DsftError(
        f"{record.source}: cannot tell the data format from the record's keys ({found}); "
        f"expected one of: {expected}; or set data.format, and data.columns for fields named otherwise"
    )


def to_example(
    record: RawRecord, fmt: str, system_prompt: str | None = None, *, require_answer: bool = True
) -> Example:
    """Validate a record of format fmt into an Example.

    system_prompt is added as the first message of a conversation that has no system message.
    With require_answer False (prompts to evaluate), a record without its answer is accepted: an
    alpaca record without output, or a conversation ending with a user turn; the Example's
    messages then end with that user turn. Raises DsftError naming the record's source and the
    bad field, or ValueError for a fmt that is not one of FORMATS.
    """
    _refuse_media(record)
    if isinstance(record.data.get("label"), bool):  # KTO's layout: read as SFT, the label would be ignored
        raise _field_error(record, "label", "a KTO label (true/false) judges the answer; train these records with "
                                            "stage: kto, or remove the field")
    if fmt == "text":
        return Example(record.source, text=_required_str(record, record.data, "text", non_empty=True))
    parsers = {"alpaca": _alpaca_messages, "messages": _messages_messages, "sharegpt": _sharegpt_messages}
    if fmt not in parsers:
        raise ValueError(f"unknown data format {fmt!r}; allowed: {', '.join(FORMATS)}")
    tools = read_tools(record)
    if tools and fmt == "alpaca":
        raise _field_error(record, "tools", "alpaca records cannot call tools; use the messages or sharegpt format")
    messages = parsers[fmt](record, require_answer) if fmt == "alpaca" else parsers[fmt](record, require_answer, tools)
    if system_prompt is not None and messages[0].role != "system":
        messages = [Message("system", system_prompt), *messages]
    thinking = record.data.get("thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise _field_error(record, "thinking", f"must be true or false, not {thinking!r}")
    return Example(record.source, messages=tuple(messages), thinking=thinking, tools=tools)


def _alpaca_messages(record: RawRecord, require_answer: bool) -> list[Message]:
    data = record.data
    instruction = _required_str(record, data, "instruction", non_empty=True)
    extra_input = _optional_str(record, data, "input")
    output = _required_str(record, data, "output") if require_answer else _optional_str(record, data, "output")
    system = _optional_str(record, data, "system")
    messages = [] if system is None else [Message("system", system)]
    messages += _alpaca_history(record)
    has_input = extra_input is not None and extra_input.strip() != ""
    prompt = f"{instruction}\n\n{extra_input}" if has_input else instruction
    messages.append(Message("user", prompt))
    if output is not None:
        messages.append(_assistant(record, "output", output, reasoning=None))
    return messages


def _alpaca_history(record: RawRecord) -> list[Message]:
    history = record.data.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise _field_error(record, "history", f"expected a list of [user, assistant] pairs, got {json_type(history)}")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise _field_error(record, f"history[{i}]", "expected a [user, assistant] pair of strings")
        messages.append(Message("user", pair[0]))
        messages.append(_assistant(record, f"history[{i}][1]", pair[1], reasoning=None))
    return messages


def _messages_messages(record: RawRecord, require_answer: bool, tools: tuple[Tool, ...]) -> list[Message]:
    turns = _conversation_list(record, "messages", require_answer)
    messages = []
    for i, turn in enumerate(turns):
        path = f"messages[{i}]"
        role = _required_str(record, turn, "role", path)
        if role not in ROLES:
            raise _field_error(record, f"{path}.role", f"unknown role (not one of {', '.join(ROLES)})")
        has_calls = role == "assistant" and turn.get("tool_calls") not in (None, [])
        # An assistant turn that only calls tools may have null or no content, as OpenAI's API sends it.
        content = _message_content(record, turn, path, required=not has_calls)
        reasoning = _message_reasoning(record, turn, path)
        if role == "assistant":
            calls = openai_calls(record, f"{path}.tool_calls", turn["tool_calls"], tools) if has_calls else ()
            messages.append(_assistant(record, f"{path}.content", content or "", reasoning, calls))
        elif reasoning is not None:
            raise _field_error(record, f"{path}.reasoning", f"only assistant messages have reasoning, not {role}")
        elif turn.get("tool_calls") not in (None, []):
            raise _field_error(record, f"{path}.tool_calls", f"only assistant messages call tools, not {role}")
        else:
            messages.append(Message(role, content))
    _check_conversation(record, "messages", messages, require_answer)
    return messages


_MEDIA_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file")
MEDIA_FIELDS = ("images", "image", "audios", "audio", "videos", "video")
"""Record fields and content parts of images, audio and video (LLaMA-Factory's and OpenAI's names)."""


def _message_content(record: RawRecord, turn: dict, path: str, required: bool) -> str | None:
    """A message's content: a string, or a list of text parts ({"type": "text", "text"}) joined; a part of an
    image, audio or video is refused by name (dsft trains text models)."""
    parts = turn.get("content")
    if not isinstance(parts, list):
        return _required_str(record, turn, "content", path) if required else _optional_str(record, turn, "content", path)
    texts = []
    for i, part in enumerate(parts):
        where = f"{path}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            raise _field_error(record, f"{where}.type", f"a {kind} part: dsft trains text models only, so records "
                                                        "with images, audio or video are refused; remove the part")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _field_error(record, where, 'expected a text part {"type": "text", "text": ...}')
        texts.append(part["text"])
    return "".join(texts)


def _refuse_media(record: RawRecord) -> None:
    for name in MEDIA_FIELDS:
        if record.data.get(name) not in (None, [], ""):
            raise _field_error(record, name, "dsft trains text models only: records with images, audio or video "
                                             "are refused rather than read as text without them; remove the field")


def _message_reasoning(record: RawRecord, turn: dict, path: str) -> str | None:
    # reasoning_content is what OpenAI-style APIs (DeepSeek's included) return.
    reasoning = _optional_str(record, turn, "reasoning", path)
    alias = _optional_str(record, turn, "reasoning_content", path)
    if reasoning is not None and alias is not None:
        raise _field_error(record, path, "set reasoning or reasoning_content, not both")
    return alias if reasoning is None else reasoning


def _sharegpt_messages(record: RawRecord, require_answer: bool, tools: tuple[Tool, ...]) -> list[Message]:
    turns = _conversation_list(record, "conversations", require_answer)
    messages = []
    for i, turn in enumerate(turns):
        path = f"conversations[{i}]"
        speaker = _required_str(record, turn, "from", path)
        if speaker not in _SHAREGPT_ROLES:
            allowed = ", ".join(_SHAREGPT_ROLES)
            raise _field_error(record, f"{path}.from", f"unknown role (not one of {allowed})")
        role = _SHAREGPT_ROLES[speaker]
        value = _required_str(record, turn, "value", path)
        if speaker == "function_call":
            messages.append(Message("assistant", "", None, sharegpt_calls(record, f"{path}.value", value, tools)))
        elif role == "assistant":
            messages.append(_assistant(record, f"{path}.value", value, reasoning=None))
        else:
            messages.append(Message(role, value))
    _check_conversation(record, "conversations", messages, require_answer)
    system = _optional_str(record, record.data, "system")
    if system is None:
        return messages
    if messages[0].role == "system":
        raise _field_error(record, "system", "a system message is also the first of 'conversations'; keep one")
    return [Message("system", system), *messages]


def _conversation_list(record: RawRecord, key: str, require_answer: bool) -> list[dict]:
    turns = record.data.get(key)
    if turns is None:
        raise _field_error(record, key, "required field is missing")
    if not isinstance(turns, list):
        raise _field_error(record, key, f"expected a list of messages, got {json_type(turns)}")
    if not turns:
        expected = "one assistant message" if require_answer else "one user or assistant message"
        raise _field_error(record, key, f"empty conversation; expected at least {expected}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _field_error(record, f"{key}[{i}]", f"expected an object, got {json_type(turn)}")
    return turns


def _check_conversation(record: RawRecord, key: str, messages: list[Message], require_answer: bool) -> None:
    """Check the order of roles: system only first, tool results only after the calls they answer and before an
    assistant turn, at least one assistant turn, an assistant turn last.

    Without require_answer, a conversation may instead end with the user turn to answer (or tool results).
    """
    for i, message in enumerate(messages[1:], start=1):
        if message.role == "system":
            raise _field_error(record, f"{key}[{i}].role", "a system message is only allowed first")
    for i, message in enumerate(messages):
        before, after = messages[i - 1] if i else None, messages[i + 1] if i + 1 < len(messages) else None
        if message.role == "tool" and not (before is not None and (before.tool_calls or before.role == "tool")):
            raise _field_error(record, f"{key}[{i}].role", "a tool result must follow the assistant turn that calls it")
        if message.role == "tool" and after is not None and after.role not in ("tool", "assistant"):
            raise _field_error(record, f"{key}[{i + 1}].role", f"tool results are answered by the assistant, not {after.role}")
        if message.tool_calls and after is not None and after.role != "tool":
            raise _field_error(record, f"{key}[{i + 1}].role", f"a turn's tool calls are followed by their results, not {after.role}")
    if not require_answer:
        if messages[-1].role == "system":
            problem = "the conversation must end with a user prompt or an assistant answer, got system"
            raise _field_error(record, f"{key}[{len(messages) - 1}].role", problem)
        return
    if not any(message.role == "assistant" for message in messages):
        raise _field_error(record, key, "no assistant message; a conversation needs one to train on")
    if messages[-1].role != "assistant":
        raise _field_error(
            record,
            f"{key}[{len(messages) - 1}].role",
            f"the conversation must end with an assistant message (the training target), got {messages[-1].role}",
        )


def _assistant(record: RawRecord, path: str, content: str, reasoning: str | None,
               calls: tuple[ToolCall, ...] = ()) -> Message:
    """An assistant Message, with reasoning given inline as a leading <think>...</think> moved out of the content."""
    match = _INLINE_REASONING.match(content)
    if match is None:
        if content.lstrip().startswith(THINK_OPEN):
            raise _field_error(record, path, f"starts with {THINK_OPEN} but has no {THINK_CLOSE}")
        return Message("assistant", content, None if reasoning is None else reasoning.strip(), calls)
    if reasoning is not None:
        problem = f"reasoning given twice: in a reasoning field and inline as {THINK_OPEN}...{THINK_CLOSE}; keep one"
        raise _field_error(record, path, problem)
    return Message("assistant", content[match.end() :].lstrip(), match.group(1).strip(), calls)


def _required_str(record: RawRecord, data: dict, key: str, parent: str = "", non_empty: bool = False) -> str:
    path = f"{parent}.{key}" if parent else key
    if data.get(key) is None:
        raise _field_error(record, path, "required field is missing")
    value = _optional_str(record, data, key, parent)
    if non_empty and not value.strip():
        raise _field_error(record, path, "must not be empty")
    return value


def _optional_str(record: RawRecord, data: dict, key: str, parent: str = "") -> str | None:
    # A null counts as absent: parquet and datasets fill optional struct fields with None.
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    path = f"{parent}.{key}" if parent else key
    raise _field_error(record, path, f"expected a string, got {json_type(value)}")


def _field_error(record: RawRecord, path: str, problem: str) -> DsftError:
    return DsftError(f"{record.source}: field '{path}': {problem}")
