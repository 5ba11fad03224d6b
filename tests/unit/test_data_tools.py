"""Tool-calling records (dsft/data/tools.py through formats.to_example): OpenAI's layout and LLaMA-Factory's
sharegpt layout read to the same Example; every bad call, schema or order gets its file:line and field."""

import json

import pytest

from dsft.data.formats import Message, to_example
from dsft.data.read import RawRecord
from dsft.data.tools import ToolCall
from dsft.errors import DsftError

SOURCE = "data/tools.jsonl:3"
WEATHER = {"name": "get_weather", "description": "Weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI = {
    "tools": [{"type": "function", "function": WEATHER}],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "assistant", "content": "18 C in Paris."},
    ],
}
LLAMA_FACTORY = {  # LLaMA-Factory's glaive_toolcall layout
    "tools": json.dumps([WEATHER]),
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18 C"},
        {"from": "gpt", "value": "18 C in Paris."},
    ],
}
EXPECTED = (Message("user", "Weather in Paris?"), Message("assistant", "", None, (ToolCall("get_weather", '{"city": "Paris"}'),)),
            Message("tool", "18 C"), Message("assistant", "18 C in Paris."))


@pytest.mark.parametrize("data, fmt", [(OPENAI, "messages"), (LLAMA_FACTORY, "sharegpt")])
def test_both_layouts_read_to_the_same_conversation(data, fmt):
    example = to_example(RawRecord(data, SOURCE), fmt)
    assert example.messages == EXPECTED
    assert [tool.name for tool in example.tools] == ["get_weather"] and example.tools[0].schema == WEATHER


def test_several_calls_and_a_bare_function_schema():
    data = {**LLAMA_FACTORY, "tools": [WEATHER]}
    data["conversations"] = [*data["conversations"][:1],
                             {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "巴黎"}},
                                                                           {"name": "get_weather", "arguments": '{"city":"Lyon"}'}])},
                             {"from": "observation", "value": "18 C"}, {"from": "observation", "value": "14 C"},
                             {"from": "gpt", "value": "Both mild."}]
    calls = to_example(RawRecord(data, SOURCE), "sharegpt").messages[1].tool_calls
    # An object is written as json.dumps writes it (non-ASCII kept); a string is kept as written.
    assert calls == (ToolCall("get_weather", '{"city": "巴黎"}'), ToolCall("get_weather", '{"city":"Lyon"}'))


def _messages(*turns, tools=None):
    return {"messages": list(turns), **({"tools": tools} if tools is not None else {"tools": [WEATHER]})}


CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}
USER = {"role": "user", "content": "q"}
ANSWER = {"role": "assistant", "content": "a"}
TOOL = {"role": "tool", "content": "r"}


@pytest.mark.parametrize("data, fmt, message", [
    (_messages(USER, {**CALL, "tool_calls": [{"function": {"name": "get_weather", "arguments": "{city: 1}"}}]}, TOOL, ANSWER),
     "messages", "field 'messages[1].tool_calls[0].function.arguments': not valid JSON"),
    (_messages(USER, {**CALL, "tool_calls": [{"function": {"name": "get_weather", "arguments": "[1]"}}]}, TOOL, ANSWER),
     "messages", "field 'messages[1].tool_calls[0].function.arguments': expected a JSON object, got list"),
    (_messages(USER, {**CALL, "tool_calls": [{"function": {"name": "book_flight", "arguments": "{}"}}]}, TOOL, ANSWER),
     "messages", "field 'messages[1].tool_calls[0].function.name': calls 'book_flight', which is not a declared tool (get_weather)"),
    (_messages(USER, CALL, TOOL, ANSWER, tools=[]),
     "messages", "calls 'get_weather', which is not a declared tool (none: the record has no tools field)"),
    (_messages(USER, TOOL, ANSWER), "messages", "field 'messages[1].role': a tool result must follow the assistant turn that calls it"),
    (_messages(USER, CALL, ANSWER), "messages", "field 'messages[2].role': a turn's tool calls are followed by their results, not assistant"),
    (_messages(USER, CALL, TOOL, USER, ANSWER), "messages", "field 'messages[3].role': tool results are answered by the assistant, not user"),
    (_messages(USER, {"role": "user", "content": "x", "tool_calls": CALL["tool_calls"]}, ANSWER), "messages",
     "field 'messages[1].tool_calls': only assistant messages call tools, not user"),
    (_messages(USER, ANSWER, tools="not json"), "messages", "field 'tools': not valid JSON"),
    (_messages(USER, ANSWER, tools=[{"type": "function", "function": {"description": "no name"}}]), "messages",
     "field 'tools[0].function.name': a tool needs a name"),
    (_messages(USER, ANSWER, tools=[WEATHER, WEATHER]), "messages", "field 'tools[1].name': tool 'get_weather' is declared twice"),
    ({**LLAMA_FACTORY, "conversations": [LLAMA_FACTORY["conversations"][0], {"from": "function_call", "value": "{oops"}]},
     "sharegpt", "field 'conversations[1].value': not valid JSON"),
    ({"instruction": "q", "output": "a", "tools": [WEATHER]}, "alpaca", "field 'tools': alpaca records cannot call tools"),
])
def test_bad_tool_records_name_source_and_field(data, fmt, message):
    with pytest.raises(DsftError) as error:
        to_example(RawRecord(data, SOURCE), fmt)
    assert str(error.value).startswith(f"{SOURCE}: ") and message in str(error.value)


def test_the_call_may_be_the_training_target_and_a_prompt_may_end_with_results():
    assert to_example(RawRecord(_messages(USER, CALL), SOURCE), "messages").messages[-1].tool_calls
    prompt = to_example(RawRecord(_messages(USER, CALL, TOOL), SOURCE), "messages", require_answer=False)
    assert prompt.messages[-1] == Message("tool", "r")
