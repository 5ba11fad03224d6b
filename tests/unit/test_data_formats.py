"""Formats: each one validated into an exact Example, and every bad input named by source and field."""

import re

import pytest

from dsft.data.formats import Example, Message, detect_format, to_example
from dsft.data.read import RawRecord
from dsft.errors import DsftError

SOURCE = "data/train.jsonl:7"


def _record(data):
    return RawRecord(data, SOURCE)


def _error(data, fmt):
    with pytest.raises(DsftError) as info:
        to_example(_record(data), fmt)
    return str(info.value)


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        ({"messages": [], "text": "x"}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"instruction": "a"}, "alpaca"),
        ({"text": "a", "meta": 1}, "text"),
    ],
)
def test_detect_format(data, fmt):
    assert detect_format(_record(data)) == fmt


def test_detect_format_unknown_keys():
    with pytest.raises(DsftError) as info:
        detect_format(_record({"prompt": "a", "completion": "b"}))
    assert str(info.value) == (
        "data/train.jsonl:7: cannot tell the data format from the record's keys (prompt, completion); "
        "expected one of: alpaca (instruction, output); messages (messages); sharegpt (conversations); "
        "text (text); or set data.format, and data.columns for fields named otherwise"
    )


def test_alpaca_with_input_system_and_history():
    data = {
        "instruction": "Add the numbers.",
        "input": "40 and 2",
        "output": "42",
        "system": "You are exact.",
        "history": [["Hi", "Hello!"], ["你好", "你好！"]],
    }
    assert to_example(_record(data), "alpaca") == Example(
        SOURCE,
        messages=(
            Message("system", "You are exact."),
            Message("user", "Hi"),
            Message("assistant", "Hello!"),
            Message("user", "你好"),
            Message("assistant", "你好！"),
            Message("user", "Add the numbers.\n\n40 and 2"),
            Message("assistant", "42"),
        ),
    )


def test_alpaca_empty_input_and_system_prompt():
    data = {"instruction": "Say hi.", "input": "", "output": "hi"}
    example = to_example(_record(data), "alpaca", system_prompt="Be brief.")
    assert example.messages == (Message("system", "Be brief."), Message("user", "Say hi."), Message("assistant", "hi"))


def test_alpaca_inline_reasoning():
    data = {"instruction": "6*7?", "output": "<think>\n six sevens \n</think>\n\n  42"}
    assert to_example(_record(data), "alpaca").messages[-1] == Message("assistant", "42", reasoning="six sevens")


def test_messages_with_reasoning_field_and_alias():
    data = {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2", "reasoning": " r2\n"},
        ]
    }
    assert to_example(_record(data), "messages", system_prompt="unused") == Example(
        SOURCE,
        messages=(
            Message("system", "sys"),
            Message("user", "q1"),
            Message("assistant", "a1", reasoning="r1"),
            Message("user", "q2"),
            Message("assistant", "a2", reasoning="r2"),
        ),
    )


def test_messages_null_optional_fields_count_as_absent():
    data = {"messages": [{"role": "user", "content": "q", "reasoning": None}, {"role": "assistant", "content": "a"}]}
    assert to_example(_record(data), "messages").messages == (Message("user", "q"), Message("assistant", "a"))


def test_sharegpt_with_top_level_system():
    data = {
        "system": "sys",
        "conversations": [
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "<think>r</think>a1"},
            {"from": "user", "value": "q2"},
            {"from": "assistant", "value": "a2"},
        ],
    }
    assert to_example(_record(data), "sharegpt") == Example(
        SOURCE,
        messages=(
            Message("system", "sys"),
            Message("user", "q1"),
            Message("assistant", "a1", reasoning="r"),
            Message("user", "q2"),
            Message("assistant", "a2"),
        ),
    )


def test_text():
    assert to_example(_record({"text": "Once upon a time."}), "text") == Example(SOURCE, text="Once upon a time.")


USER_Q = {"role": "user", "content": "q"}
ASSISTANT_A = {"role": "assistant", "content": "a"}
HUMAN_Q = {"from": "human", "value": "q"}


@pytest.mark.parametrize(
    ("data", "fmt", "message"),
    [
        ({"output": "a"}, "alpaca", "field 'instruction': required field is missing"),
        ({"instruction": " ", "output": "a"}, "alpaca", "field 'instruction': must not be empty"),
        ({"instruction": "q"}, "alpaca", "field 'output': required field is missing"),
        ({"instruction": "q", "output": 42}, "alpaca", "field 'output': expected a string, got number"),
        (
            {"instruction": "q", "output": "a", "history": [["x"]]},
            "alpaca",
            "field 'history[0]': expected a [user, assistant] pair of strings",
        ),
        (
            {"instruction": "q", "output": "a", "history": "x"},
            "alpaca",
            "field 'history': expected a list of [user, assistant] pairs, got string",
        ),
        ({"messages": []}, "messages", "field 'messages': empty conversation; expected at least one assistant message"),
        ({"messages": "hi"}, "messages", "field 'messages': expected a list of messages, got string"),
        ({"messages": ["hi"]}, "messages", "field 'messages[0]': expected an object, got string"),
        (
            {"messages": [USER_Q, ASSISTANT_A, {"role": "bot", "content": "x"}]},
            "messages",
            "field 'messages[2].role': unknown role (not one of system, user, assistant, tool)",
        ),
        (
            {"messages": [{"role": "user"}, ASSISTANT_A]},
            "messages",
            "field 'messages[0].content': required field is missing",
        ),
        ({"messages": [{"content": "q"}]}, "messages", "field 'messages[0].role': required field is missing"),
        (
            {"messages": [{"role": "user", "content": [{"text": "q"}]}, ASSISTANT_A]},
            "messages",
            "field 'messages[0].content[0]': expected a text part {\"type\": \"text\", \"text\": ...}",
        ),
        (
            {"messages": [USER_Q, {"role": "system", "content": "s"}, ASSISTANT_A]},
            "messages",
            "field 'messages[1].role': a system message is only allowed first",
        ),
        (
            {"messages": [{"role": "system", "content": "s"}, USER_Q]},
            "messages",
            "field 'messages': no assistant message; a conversation needs one to train on",
        ),
        (
            {"messages": [ASSISTANT_A, USER_Q]},
            "messages",
            "field 'messages[1].role': the conversation must end with an assistant message (the training target), "
            "got user",
        ),
        (
            {"messages": [USER_Q, {"role": "assistant", "content": "<think>r</think>a", "reasoning": "r"}]},
            "messages",
            "field 'messages[1].content': reasoning given twice: in a reasoning field and inline as "
            "<think>...</think>; keep one",
        ),
        (
            {"messages": [USER_Q, {**ASSISTANT_A, "reasoning": "r", "reasoning_content": "r"}]},
            "messages",
            "field 'messages[1]': set reasoning or reasoning_content, not both",
        ),
        (
            {"messages": [{**USER_Q, "reasoning": "r"}, ASSISTANT_A]},
            "messages",
            "field 'messages[0].reasoning': only assistant messages have reasoning, not user",
        ),
        (
            {"messages": [USER_Q, {"role": "assistant", "content": "<think>r and no end"}]},
            "messages",
            "field 'messages[1].content': starts with <think> but has no </think>",
        ),
        (
            {"conversations": [HUMAN_Q, {"from": "bot", "value": "a"}]},
            "sharegpt",
            "field 'conversations[1].from': unknown role (not one of human, user, gpt, assistant, system, function_call, observation)",
        ),
        (
            {"conversations": [HUMAN_Q, {"from": "gpt"}]},
            "sharegpt",
            "field 'conversations[1].value': required field is missing",
        ),
        (
            {"conversations": []},
            "sharegpt",
            "field 'conversations': empty conversation; expected at least one assistant message",
        ),
        (
            {"system": "s", "conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}]},
            "sharegpt",
            "field 'system': a system message is also the first of 'conversations'; keep one",
        ),
        ({"text": ""}, "text", "field 'text': must not be empty"),
        ({"content": "x"}, "text", "field 'text': required field is missing"),
    ],
)
def test_bad_records_name_source_and_field(data, fmt, message):
    assert _error(data, fmt) == f"{SOURCE}: {message}"


def test_unknown_format_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown data format 'chatml'"):
        to_example(_record({"text": "a"}), "chatml")


@pytest.mark.parametrize(
    ("data", "fmt", "messages"),
    [
        (
            {"instruction": "Add.", "input": "40 and 2", "system": "s"},
            "alpaca",
            (Message("system", "s"), Message("user", "Add.\n\n40 and 2")),
        ),
        ({"messages": [USER_Q]}, "messages", (Message("user", "q"),)),
        (
            {"messages": [USER_Q, ASSISTANT_A, {"role": "user", "content": "q2"}]},
            "messages",
            (Message("user", "q"), Message("assistant", "a"), Message("user", "q2")),
        ),
        ({"system": "s", "conversations": [HUMAN_Q]}, "sharegpt", (Message("system", "s"), Message("user", "q"))),
        # A record that has its answer reads exactly as with require_answer.
        ({"instruction": "q", "output": "a"}, "alpaca", (Message("user", "q"), Message("assistant", "a"))),
    ],
)
def test_prompt_only_records_without_require_answer(data, fmt, messages):
    assert to_example(_record(data), fmt, require_answer=False) == Example(SOURCE, messages=messages)


def test_prompt_only_record_gets_the_system_prompt():
    example = to_example(_record({"instruction": "q"}), "alpaca", system_prompt="Be brief.", require_answer=False)
    assert example.messages == (Message("system", "Be brief."), Message("user", "q"))


@pytest.mark.parametrize(
    ("data", "fmt", "message"),
    [
        ({"output": "a"}, "alpaca", "field 'instruction': required field is missing"),
        ({"instruction": "q", "output": 42}, "alpaca", "field 'output': expected a string, got number"),
        (
            {"messages": []},
            "messages",
            "field 'messages': empty conversation; expected at least one user or assistant message",
        ),
        (
            {"messages": [{"role": "system", "content": "s"}]},
            "messages",
            "field 'messages[0].role': the conversation must end with a user prompt or an assistant answer, got system",
        ),
        (
            {"messages": [USER_Q, {"role": "system", "content": "s"}]},
            "messages",
            "field 'messages[1].role': a system message is only allowed first",
        ),
        (
            {"conversations": [{"from": "bot", "value": "q"}]},
            "sharegpt",
            "field 'conversations[0].from': unknown role (not one of human, user, gpt, assistant, system, function_call, observation)",
        ),
    ],
)
def test_prompt_only_records_are_still_validated(data, fmt, message):
    with pytest.raises(DsftError) as info:
        to_example(_record(data), fmt, require_answer=False)
    assert str(info.value) == f"{SOURCE}: {message}"


def test_a_record_may_set_its_own_thinking_mode():
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}]
    assert to_example(_record({"messages": chat, "thinking": True}), "messages").thinking is True
    assert to_example(_record({"instruction": "q", "output": "a", "thinking": False}), "alpaca").thinking is False
    assert to_example(_record({"messages": chat}), "messages").thinking is None
    with pytest.raises(DsftError, match=f"{SOURCE}: field 'thinking': must be true or false, not 'yes'"):
        to_example(_record({"messages": chat, "thinking": "yes"}), "messages")


def test_content_as_a_list_of_text_parts_is_joined():
    chat = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]
    assert to_example(_record({"messages": chat}), "messages").messages == (Message("user", "What is 2+2?"),
                                                                            Message("assistant", "4"))


@pytest.mark.parametrize("data, field", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                               {"type": "text", "text": "what is this?"}]},
                   {"role": "assistant", "content": "a cat"}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "<image>what is this?"}, {"role": "assistant", "content": "a cat"}],
      "images": ["cat.png"]}, "images"),
    ({"conversations": [{"from": "human", "value": "<audio>hear"}, {"from": "gpt", "value": "ok"}],
      "audios": ["a.wav"]}, "audios"),
    ({"instruction": "<video>describe", "output": "a dog", "videos": ["v.mp4"]}, "videos"),
])
def test_images_audio_and_video_are_refused_by_name(data, field):
    with pytest.raises(DsftError, match=rf"{SOURCE}: field '{re.escape(field)}': .*dsft trains text models only"):
        to_example(_record(data), detect_format(_record(data)))


def test_a_part_that_is_not_text_is_a_clear_error():
    chat = [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DsftError, match=r"field 'messages\[0\].content\[0\]': expected a text part"):
        to_example(_record({"messages": chat}), "messages")
