"""Preference pairs (prompt, chosen answer, rejected answer) for reward models and DPO.

Two record shapes, detected per record:

- alpaca style: {"instruction" (or "prompt"), "input"?, "system"?, "chosen": str, "rejected": str};
- messages style: {"prompt": [messages]?, "chosen": [messages], "rejected": [messages]}. Without a
  prompt field, chosen and rejected are whole conversations that share every turn but the last
  (the final assistant turn is the answer), as TRL's implicit-prompt datasets are;
- LLaMA-Factory's layout: the prompt as a conversation ("conversations" in sharegpt, or "messages"),
  chosen and rejected as one answer message each ({"from": "gpt", "value"} or {"role", "content"}).

Answers may carry reasoning (a `reasoning` field in messages style, or inline <think>...</think>).
Every problem raises DsftError naming file:line and the field, never quoting the values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dsft.data.formats import Message, to_example
from dsft.data.read import RawRecord, json_type
from dsft.errors import DsftError

SHAPES = ("alpaca style (instruction or prompt, chosen, rejected as strings), messages style (chosen, rejected as "
          "message lists) or LLaMA-Factory's (conversations or messages, chosen and rejected as one message each)")


@dataclass(frozen=True)
class PreferencePair:
    source: str
    """"path:LINE" of the record."""
    prompt: tuple[Message, ...]
    """The conversation up to the answer: an optional system message, ending with a user turn."""
    chosen: Message
    """The preferred assistant answer."""
    rejected: Message
    """The dispreferred assistant answer."""


def to_pair(record: RawRecord, system_prompt: str | None = None) -> PreferencePair:
    """Validate one preference record; raises DsftError naming the record and field."""
    data = record.data
    for key in ("chosen", "rejected"):
        if data.get(key) is None:
            raise DsftError(f"{record.source}: field '{key}' is missing; a preference record is {SHAPES}")
    kinds = {json_type(data["chosen"]), json_type(data["rejected"])}
    if kinds == {"string"}:
        pair = _alpaca_pair(record)
    elif kinds == {"list"}:
        pair = _messages_pair(record)
    elif kinds == {"object"}:
        pair = _conversation_pair(record)
    else:
        raise DsftError(f"{record.source}: fields 'chosen' and 'rejected' must both be strings, both message lists "
                        f"or both message objects (got {json_type(data['chosen'])} and {json_type(data['rejected'])})")
    if (pair.chosen.content, pair.chosen.reasoning) == (pair.rejected.content, pair.rejected.reasoning):
        raise DsftError(f"{record.source}: 'chosen' and 'rejected' are the same answer; a pair must differ")
    if system_prompt is not None and pair.prompt[0].role != "system":
        pair = PreferencePair(pair.source, (Message("system", system_prompt), *pair.prompt), pair.chosen, pair.rejected)
    return pair


def _alpaca_pair(record: RawRecord) -> PreferencePair:
    data = dict(record.data)
    if "instruction" not in data and isinstance(data.get("prompt"), str):
        data["instruction"] = data["prompt"]
    if "instruction" not in data:
        raise DsftError(f"{record.source}: field 'instruction' (or 'prompt') is missing; the prompt of the pair")
    answers = []
    for key in ("chosen", "rejected"):
        fields = {k: v for k, v in data.items() if k not in ("chosen", "rejected", "prompt")}
        example = to_example(RawRecord({**fields, "output": data[key]}, record.source), "alpaca")
        *prompt, answer = example.messages
        answers.append(_renamed(answer, key, record))
    return PreferencePair(record.source, tuple(prompt), *answers)


def _messages_pair(record: RawRecord) -> PreferencePair:
    data = record.data
    prompt_turns = data.get("prompt", [])
    if not isinstance(prompt_turns, list):
        raise DsftError(f"{record.source}: field 'prompt' must be a message list in messages style, "
                        f"got {json_type(prompt_turns)}")
    conversations = [_conversation(record, prompt_turns, key) for key in ("chosen", "rejected")]
    (*chosen_prompt, chosen), (*rejected_prompt, rejected) = conversations
    if chosen_prompt != rejected_prompt:
        turn = next(i for i, (a, b) in enumerate(zip(chosen_prompt + [None], rejected_prompt + [None])) if a != b)
        raise DsftError(f"{record.source}: 'chosen' and 'rejected' differ at turn {turn} before their final answer; "
                        "they must share the same prompt turns (or give them once in 'prompt')")
    if not chosen_prompt or chosen_prompt[-1].role != "user":
        raise DsftError(f"{record.source}: the prompt of the pair must end with a user turn")
    return PreferencePair(record.source, tuple(chosen_prompt), chosen, rejected)


def _conversation_pair(record: RawRecord) -> PreferencePair:
    """LLaMA-Factory's layout: the prompt conversation, then each answer message appended and read with it."""
    data = record.data
    key = "conversations" if "conversations" in data else "messages"
    if not isinstance(data.get(key), list):
        raise DsftError(f"{record.source}: field 'conversations' (or 'messages') must hold the prompt conversation "
                        "when chosen and rejected are single messages")
    fmt = "sharegpt" if key == "conversations" else "messages"
    fields = {k: v for k, v in data.items() if k not in ("chosen", "rejected")}
    answers, prompts = [], []
    for name in ("chosen", "rejected"):
        joined = RawRecord({**fields, key: [*data[key], data[name]]}, record.source)
        try:
            *prompt, answer = to_example(joined, fmt).messages
        except DsftError as error:
            last = len(data[key])
            raise DsftError(str(error).replace(f"{key}[{last}]", name)) from None
        answers.append(_renamed(answer, name, record))
        prompts.append(tuple(prompt))
    if not prompts[0] or prompts[0][-1].role != "user":
        raise DsftError(f"{record.source}: the prompt of the pair must end with a user turn")
    return PreferencePair(record.source, prompts[0], *answers)


def _conversation(record: RawRecord, prompt_turns: list, key: str) -> list[Message]:
    """prompt + the key's turns, validated as one conversation that ends with an assistant answer."""
    turns = record.data[key]
    try:
        example = to_example(RawRecord({"messages": [*prompt_turns, *turns]}, record.source), "messages")
    except DsftError as error:
        # Point at the field the user wrote: messages[i] of the joined list is key[i - len(prompt)].
        raise DsftError(_field_named(str(error), key, len(prompt_turns))) from None
    return list(example.messages)


def _field_named(message: str, key: str, prompt_length: int) -> str:
    import re

    def rename(match: re.Match) -> str:
        index = int(match.group(1))
        return f"prompt[{index}]" if index < prompt_length else f"{key}[{index - prompt_length}]"

    return re.sub(r"messages\[(\d+)\]", rename, message).replace("field 'messages'", f"field '{key}'")


def _renamed(answer: Message, key: str, record: RawRecord) -> Message:
    if answer.role != "assistant":
        raise DsftError(f"{record.source}: field '{key}' must be an assistant answer")
    return answer


def pair_lengths(pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """Mean characters of chosen and rejected answers (a length bias a reward model can learn instead of quality)."""
    count = max(len(pairs), 1)
    return {"chosen_chars_mean": sum(len(p.chosen.content) for p in pairs) / count,
            "rejected_chars_mean": sum(len(p.rejected.content) for p in pairs) / count}
