"""The text fields of a raw record in each format: read them, or rewrite them all with one function.

Data preparation works on raw records (so outputs keep the user's format and extra fields);
these helpers are the one place that knows where each format keeps its text.
"""

from __future__ import annotations

from collections.abc import Callable


def _alpaca_paths(record: dict) -> list[tuple]:
    paths = [(key,) for key in ("system", "instruction", "input", "output") if isinstance(record.get(key), str)]
    for i, pair in enumerate(record.get("history") or []):
        if isinstance(pair, list):
            paths += [("history", i, j) for j, value in enumerate(pair) if isinstance(value, str)]
    return paths


def _turn_paths(record: dict, key: str, text_keys: tuple[str, ...]) -> list[tuple]:
    paths = [("system",)] if isinstance(record.get("system"), str) else []
    for i, turn in enumerate(record.get(key) or []):
        if isinstance(turn, dict):
            paths += [(key, i, name) for name in text_keys if isinstance(turn.get(name), str)]
    return paths


def text_paths(record: dict, fmt: str) -> list[tuple]:
    """Key paths of every text string of a record of format fmt, in reading order."""
    if fmt == "alpaca":
        return _alpaca_paths(record)
    if fmt == "messages":
        return _turn_paths(record, "messages", ("content", "reasoning", "reasoning_content"))
    if fmt == "sharegpt":
        return _turn_paths(record, "conversations", ("value",))
    if fmt == "text":
        return [("text",)] if isinstance(record.get("text"), str) else []
    raise ValueError(f"unknown format {fmt!r}")


def _get(record: dict, path: tuple):
    node = record
    for part in path:
        node = node[part]
    return node


def texts(record: dict, fmt: str) -> list[str]:
    """Every text string of the record, in reading order."""
    return [_get(record, path) for path in text_paths(record, fmt)]


def record_text(record: dict, fmt: str) -> str:
    """All text of a record joined by newlines: what dedup, filters and the contamination check read."""
    return "\n".join(texts(record, fmt))


def _copy(node):
    # Records are JSON values: copying dicts and lists is all deepcopy would do, at a fraction of its cost.
    if isinstance(node, dict):
        return {key: _copy(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_copy(value) for value in node]
    return node


def map_texts(record: dict, fmt: str, function: Callable[[str], str]) -> dict:
    """A copy of record with function applied to every text string (the input record is not changed)."""
    out = _copy(record)
    for path in text_paths(out, fmt):
        parent = _get(out, path[:-1])
        parent[path[-1]] = function(parent[path[-1]])
    return out


def answer_text(record: dict, fmt: str) -> str | None:
    """The answer to learn: alpaca output or the final assistant turn; None for text records."""
    if fmt == "alpaca":
        return record.get("output") if isinstance(record.get("output"), str) else None
    key, role_key, value_key, roles = {
        "messages": ("messages", "role", "content", ("assistant",)),
        "sharegpt": ("conversations", "from", "value", ("gpt", "assistant")),
    }.get(fmt, (None, None, None, ()))
    turns = record.get(key) or [] if key else []
    for turn in reversed(turns):
        if isinstance(turn, dict) and turn.get(role_key) in roles:
            return turn.get(value_key) if isinstance(turn.get(value_key), str) else None
    return None


def prompt_paths(record: dict, fmt: str) -> list[tuple]:
    """Text paths that are not the answer to learn (what augmentation may change without changing labels)."""
    answer_paths = {("output",)} if fmt == "alpaca" else set()
    if fmt in ("messages", "sharegpt"):
        answer_paths = {p for p in text_paths(record, fmt) if len(p) == 3 and _is_assistant(record, fmt, p)}
    return [p for p in text_paths(record, fmt) if p not in answer_paths]


def _is_assistant(record: dict, fmt: str, path: tuple) -> bool:
    turn = record[path[0]][path[1]]
    return turn.get("role") == "assistant" if fmt == "messages" else turn.get("from") in ("gpt", "assistant")
