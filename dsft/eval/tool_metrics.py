"""Tool-call metrics of `dsft eval`: how a model's replies call tools, against references whose final turn calls.

Over the examples whose reference calls tools:
  tool_call_rate             the reply calls (in the template's tool format)
  tool_name_exact            the reply calls the reference's tools, by name, in order
  tool_arguments_valid_json  every argument of the reply's calls is a JSON object (over replies that call)
  tool_arguments_exact       names and arguments (compared as parsed JSON) equal the reference's calls
and over the examples whose reference answers without calling:
  tool_false_call_rate       the reply calls anyway
Calls are read in the built-in DeepSeek formats (dsft.data.deepseek_layouts); a model rendered with a tokenizer's
own template has no format dsft can read, and the metrics are reported unavailable.
"""

from __future__ import annotations

from collections.abc import Sequence

from dsft.data.deepseek_layouts import LAYOUTS, arguments_object, read_calls
from dsft.data.tools import ToolCall


def tool_call_metrics(replies: Sequence[str], references: Sequence[tuple[ToolCall, ...] | None],
                      template: str) -> tuple[dict[str, float], str | None]:
    """(metrics, why they are unavailable or None) of replies against references (the reference turn's calls;
    None for an example without a reference)."""
    calling = [(reply, ref) for reply, ref in zip(replies, references, strict=True) if ref]
    if not calling:
        return {}, "no reference answer calls a tool"
    if template not in LAYOUTS:
        return {}, f"tool calls are read in the DeepSeek formats; this model renders with {template}"
    found = [(_calls(reply, template), list(ref)) for reply, ref in calling]
    called = [calls for calls, _ in found if calls]
    metrics = {
        "tool_call_rate": _share(bool(calls) for calls, _ in found),
        "tool_name_exact": _share([n for n, _ in calls] == [c.name for c in ref] for calls, ref in found),
        "tool_arguments_exact": _share(_same(calls, ref) for calls, ref in found),
    }
    if called:
        metrics["tool_arguments_valid_json"] = _share(all(arguments_object(a) is not None for _, a in calls)
                                                      for calls in called)
    plain = [reply for reply, ref in zip(replies, references, strict=True) if ref is not None and not ref]
    if plain:
        metrics["tool_false_call_rate"] = _share(bool(_calls(reply, template)) for reply in plain)
    return metrics, None


def _calls(reply: str, template: str) -> list[tuple[str, str]]:
    found = read_calls(reply, template)
    return [] if found is None else found[1]


def _same(calls: list[tuple[str, str]], reference: list[ToolCall]) -> bool:
    return len(calls) == len(reference) and all(
        name == ref.name and arguments_object(arguments) is not None
        and arguments_object(arguments) == arguments_object(ref.arguments)
        for (name, arguments), ref in zip(calls, reference, strict=True))


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags)
