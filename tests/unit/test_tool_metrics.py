"""dsft eval's tool-call metrics, exact on hand-made replies."""

import pytest

from dsft.data.tools import ToolCall
from dsft.eval.tool_metrics import tool_call_metrics

PARIS = ToolCall("get_weather", '{"city": "Paris"}')


def v31(name: str, arguments: str) -> str:
    return f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{arguments}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"


def test_rates_over_calling_and_plain_references():
    replies = [v31("get_weather", '{"city":"Paris"}'),  # same arguments as parsed JSON: exact
               v31("get_weather", '{"city": "Lyon"}'),  # the right tool, other arguments
               v31("get_time", "{}"),  # another tool
               v31("get_weather", "{city: Paris}"),  # not JSON
               "It is sunny.",  # no call where one was due
               v31("get_weather", "{}"),  # a call where a plain answer was due
               "Hello."]
    references = [(PARIS,)] * 5 + [(), ()]
    metrics, unavailable = tool_call_metrics(replies, references, "deepseek_v31")
    assert unavailable is None
    assert metrics == pytest.approx({"tool_call_rate": 4 / 5, "tool_name_exact": 3 / 5, "tool_arguments_exact": 1 / 5,
                                     "tool_arguments_valid_json": 3 / 4, "tool_false_call_rate": 1 / 2})


def test_unavailable_without_calling_references_or_a_readable_format():
    assert tool_call_metrics(["x"], [()], "deepseek_v31") == ({}, "no reference answer calls a tool")
    metrics, unavailable = tool_call_metrics(["x"], [(PARIS,)], "tokenizer")
    assert metrics == {} and "DeepSeek formats" in unavailable
