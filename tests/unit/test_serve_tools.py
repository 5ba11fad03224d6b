"""dsft serve's tool calls (dsft/serve/tool_calls.py): a reply's calls parsed in each DeepSeek format, a stream
holding text from the calls marker on, and every bad request a 400 naming its field."""

import json

import pytest

from dsft.serve.openai_schema import ApiError, ChatCompletionRequest, parse_request
from dsft.serve.tool_calls import ToolCallStream, forced_opening, parse_calls, read_request

V31_CALL = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>'
V3_CALL = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n'
           '```<｜tool▁call▁end｜>')
DECLARED = {"get_weather", "local_time"}


def function(call: dict) -> tuple[str, str]:
    assert call["type"] == "function" and call["id"].startswith("call-")
    return call["function"]["name"], call["function"]["arguments"]


@pytest.mark.parametrize("template, reply", [
    ("deepseek_v31", V31_CALL + "<｜tool▁calls▁end｜>"), ("deepseek_v31", V31_CALL),  # stopped before the end marker
    ("deepseek_v3", V3_CALL + "<｜tool▁calls▁end｜>"), ("deepseek_r1_0528", V3_CALL),
])
def test_a_call_parses_in_its_templates_format(template, reply):
    content, calls = parse_calls("Let me check." + reply, template, DECLARED)
    assert content == "Let me check." and [function(c) for c in calls] == [("get_weather", '{"city": "Paris"}')]


def test_several_calls_and_what_does_not_parse():
    two = V31_CALL[:-len("<｜tool▁call▁end｜>")] + '<｜tool▁call▁end｜><｜tool▁call▁begin｜>local_time<｜tool▁sep｜>{}<｜tool▁call▁end｜>'
    assert [function(c)[0] for c in parse_calls(two, "deepseek_v31", DECLARED)[1]] == ["get_weather", "local_time"]
    for bad in (V31_CALL.replace('{"city": "Paris"}', '{"city": Paris'),  # not JSON
                V31_CALL.replace('{"city": "Paris"}', "[1, 2]"),  # not an object
                V31_CALL.replace("get_weather", "book_flight"),  # not a declared tool
                "no calls at all", V3_CALL):  # V3's format is not V3.1's
        assert parse_calls(bad, "deepseek_v31", DECLARED) is None, bad
    assert parse_calls(V31_CALL, "tokenizer", DECLARED) is None  # another model's format is unknown


def test_a_stream_passes_text_on_and_holds_the_calls():
    stream = ToolCallStream("deepseek_v31", DECLARED)
    text = "Checking" + V31_CALL + "<｜tool▁calls▁end｜>"
    passed = [stream.feed(text[i:i + 7]) for i in range(0, len(text), 7)]
    assert "".join(passed) == "Checking" and stream.finish()[0] == "" and function(stream.finish()[1][0])[0] == "get_weather"
    broken = ToolCallStream("deepseek_v31", DECLARED)
    assert broken.feed("<｜tool▁calls") == ""  # could be the marker: held
    assert broken.feed(" is a word") == "<｜tool▁calls is a word" and broken.finish() == ("", None)
    invalid = ToolCallStream("deepseek_v31", DECLARED)
    invalid.feed(V31_CALL.replace('"Paris"}', '"Paris"'))
    content, calls = invalid.finish()
    assert calls is None and content.startswith("<｜tool▁calls▁begin｜>")  # returned as text


def test_a_forced_call_begins_in_the_prompt():
    assert forced_opening("deepseek_v31", "get_weather") == "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
    stream = ToolCallStream("deepseek_v31", DECLARED, forced_opening("deepseek_v31", "get_weather"))
    assert stream.feed('{"city": "Paris"}<｜tool▁call▁end｜>') == ""
    assert function(stream.finish()[1][0]) == ("get_weather", '{"city": "Paris"}')


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def request(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS, **fields}
    return parse_request(json.dumps(body).encode(), ChatCompletionRequest)


def test_a_request_reads_as_a_record():
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]
    use = read_request(request(messages=history), "deepseek_v31")
    assert [m.role for m in use.example.messages] == ["user", "assistant", "tool"] and use.parses
    assert not read_request(request(tool_choice="none"), "deepseek_v31").parses  # the tools are not offered
    forced = read_request(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}), "deepseek_v3")
    assert forced.forced == "get_weather"


@pytest.mark.parametrize("fields, param, words", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the request's tools"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{bad"}}]}]}, "messages", "not valid JSON"),
    ({"messages": [{"role": "tool", "content": "r"}]}, "messages", "must follow the assistant turn that calls it"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "declared twice"),
])
def test_bad_tool_requests_are_400_naming_the_field(fields, param, words):
    with pytest.raises(ApiError) as caught:
        read_request(request(**fields), "deepseek_v31")
    assert caught.value.status == 400 and caught.value.param == param and words in caught.value.message


def test_a_forced_call_needs_a_deepseek_template():
    with pytest.raises(ApiError, match="tool_choice by name needs a DeepSeek template"):
        read_request(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}), "tokenizer")
