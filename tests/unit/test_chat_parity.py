"""dsft's built-in DeepSeek templates against the models' own jinja templates (copies in tests/golden/chat_templates,
sources in its SOURCES.md), rendered by transformers' apply_chat_template on many conversations: the text and the
token ids of every prompt, and of every conversation the official template can render whole.

What the official templates cannot render, dsft defines and the tests pin:
- a final turn's reasoning (every template drops it: R1's and V3.1's split it off at </think>, V3's has no place
  for it). In V3.1's thinking mode the target is what the model writes after the <think> prompt, reasoning
  </think> answer, so prompt + target is the official prompt followed by that output.
- R1's training target closes the think block its prompt opened (R1's template renders finished turns without it).
"""

from pathlib import Path

import pytest

from dsft.data.chat import check_thinking, recognise_template, render_conversation, render_prompt
from dsft.data.encode import encode_segments
from dsft.data.formats import Message
from dsft.data.deepseek_layouts import tool_system_prompt
from dsft.data.hf_templates import JINJA_TEMPLATES
from dsft.data.tools import Tool, ToolCall
from dsft.data.tokenizer import EOS, THINK_CLOSE
from dsft.errors import DsftError

COPIES = Path(__file__).parents[1] / "golden" / "chat_templates"
OFFICIAL = {
    "deepseek-v3.jinja": "deepseek_v3",
    "deepseek-r1.jinja": "deepseek_r1",
    "deepseek-r1-distill-qwen-32b.jinja": "deepseek_r1",
    "deepseek-v3-0324.jinja": "deepseek_r1_0528",
    "deepseek-v3.1.jinja": "deepseek_v31",
}
SYSTEM = Message("system", "You are a careful clinician. 请用中文回答")
ASK, ASK_AGAIN = Message("user", "What dose of amoxicillin?"), Message("user", "And for a child of 20 kg?\nBe brief.")
ANSWER = Message("assistant", "500 mg every 8 hours.")
REASONED = Message("assistant", "25 mg/kg/day, split.", reasoning="20 kg times 25 mg is 500 mg a day")
CONVERSATIONS = {
    "one turn": (ASK, ANSWER),
    "system": (SYSTEM, ASK, ANSWER),
    "multi-turn": (ASK, ANSWER, ASK_AGAIN, Message("assistant", "About 170 mg three times a day.")),
    "system, multi-turn": (SYSTEM, ASK, ANSWER, ASK_AGAIN, ANSWER, ASK, ANSWER),
    "reasoning in history": (SYSTEM, ASK, REASONED, ASK_AGAIN, ANSWER),
    "reasoning in the final turn": (ASK, ANSWER, ASK_AGAIN, REASONED),
    "empty answer": (ASK, Message("assistant", "")),
}


def chat_dicts(messages) -> list[dict]:
    # As an OpenAI-style client sends them: reasoning in reasoning_content, which every template leaves out.
    return [{"role": m.role, "content": m.content, **({"reasoning_content": m.reasoning} if m.reasoning else {})}
            for m in messages]


def official(tokenizer, copy: str, messages, generation: bool, thinking: bool | None = None) -> str:
    variables = {} if thinking is None else {"thinking": thinking}
    return tokenizer.apply_chat_template(chat_dicts(messages), chat_template=(COPIES / copy).read_text("utf-8"),
                                         tokenize=False, add_generation_prompt=generation, **variables)


def text_and_ids(segments, tokenizer) -> tuple[str, list[int]]:
    return "".join(s.text for s in segments), encode_segments(segments, tokenizer)[0]


def ids_of(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def thinking_modes(template: str) -> list[bool | None]:
    return [False, True] if template == "deepseek_v31" else [None]


def test_every_copy_is_recognised_as_its_builtin_template():
    assert {copy: recognise_template((COPIES / copy).read_text("utf-8")) for copy in OFFICIAL} == OFFICIAL
    assert recognise_template("{{ messages[0]['content'] }}") is None  # not DeepSeek's markers


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("copy", OFFICIAL)
def test_prompts_equal_the_official_template(tokenizer, copy, name):
    template, history = OFFICIAL[copy], CONVERSATIONS[name][:-1]
    for thinking in thinking_modes(template):
        text, ids = text_and_ids(render_prompt(history, template, tokenizer, thinking), tokenizer)
        expected = official(tokenizer, copy, history, generation=True, thinking=thinking)
        assert text == expected, thinking
        assert ids == ids_of(expected, tokenizer)


@pytest.mark.parametrize("name", [n for n, c in CONVERSATIONS.items() if c[-1].reasoning is None])
@pytest.mark.parametrize("copy", [c for c, t in OFFICIAL.items() if t != "deepseek_r1"])
def test_whole_conversations_equal_the_official_template(tokenizer, copy, name):
    template, messages = OFFICIAL[copy], CONVERSATIONS[name]
    thinking = False if template == "deepseek_v31" else None
    text, ids = text_and_ids(render_conversation(messages, template, tokenizer, "assistant", thinking), tokenizer)
    expected = official(tokenizer, copy, messages, generation=False, thinking=thinking)
    assert text == expected
    assert ids == ids_of(expected, tokenizer)


def test_v31_thinking_trains_the_reasoning_the_model_writes_after_its_prompt(tokenizer):
    messages = CONVERSATIONS["reasoning in the final turn"]
    segments = render_conversation(messages, "deepseek_v31", tokenizer, "final_assistant")  # auto: it reasons
    prompt = official(tokenizer, "deepseek-v3.1.jinja", messages[:-1], generation=True, thinking=True)
    output = f"{REASONED.reasoning}{THINK_CLOSE}{REASONED.content}{EOS}"
    prompt_text = "".join(s.text for s in segments if not s.trainable)
    assert (prompt_text, [s.text for s in segments if s.trainable]) == (prompt, [output])
    assert encode_segments(segments, tokenizer)[0] == ids_of(prompt + output, tokenizer)
    # Once answered, the official template shows that turn as V3.1 shows every past turn: </think> answer.
    follow_up = (*messages, ASK)
    assert "".join(s.text for s in render_prompt(follow_up, "deepseek_v31", tokenizer, True)) == \
        official(tokenizer, "deepseek-v3.1.jinja", follow_up, generation=True, thinking=True)


def test_r1_targets_close_the_think_block_the_prompt_opened(tokenizer):
    for messages, reasoning in ((CONVERSATIONS["one turn"], ""), (CONVERSATIONS["reasoning in the final turn"],
                                                                   REASONED.reasoning)):
        segments = render_conversation(messages, "deepseek_r1", tokenizer, "final_assistant")
        prompt = official(tokenizer, "deepseek-r1.jinja", messages[:-1], generation=True)
        assert "".join(s.text for s in segments) == f"{prompt}{reasoning}\n{THINK_CLOSE}\n\n{messages[-1].content}{EOS}"


def test_reasoning_in_non_thinking_mode_is_refused_unless_dropped(tokenizer):
    messages = CONVERSATIONS["reasoning in the final turn"]
    with pytest.raises(DsftError, match="trains only in thinking mode; set data.thinking: on or auto .*data.reasoning: drop"):
        render_conversation(messages, "deepseek_v31", tokenizer, "assistant", thinking=False)
    dropped = render_conversation(messages, "deepseek_v31", tokenizer, "assistant", thinking=False, reasoning="drop")
    plain = (*messages[:-1], Message("assistant", REASONED.content))
    assert "".join(s.text for s in dropped) == official(tokenizer, "deepseek-v3.1.jinja", plain, generation=False,
                                                        thinking=False)


@pytest.mark.parametrize("template, thinking, problem", [
    ("deepseek_v3", True, "has no thinking mode"), ("deepseek_r1", False, "always thinks"),
    ("deepseek_r1_0528", False, "always thinks"),
])
def test_thinking_a_template_cannot_give_is_refused_by_name(template, thinking, problem):
    with pytest.raises(DsftError, match=f"data.thinking: {'on' if thinking else 'off'}, but {template} {problem}"):
        check_thinking(template, thinking)
    check_thinking("deepseek_v31", thinking)  # both modes


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("template", sorted(JINJA_TEMPLATES))
def test_the_twin_a_run_saves_renders_its_prompts_as_dsft(tokenizer, template, name):
    history = CONVERSATIONS[name][:-1]
    for thinking in thinking_modes(template):
        variables = {} if thinking is None else {"thinking": thinking}
        twin = tokenizer.apply_chat_template(chat_dicts(history), chat_template=JINJA_TEMPLATES[template],
                                             tokenize=False, add_generation_prompt=True, **variables)
        assert twin == "".join(s.text for s in render_prompt(history, template, tokenizer, thinking))
    assert recognise_template(JINJA_TEMPLATES[template]) == template  # auto maps a saved run back to it


WEATHER = Tool("get_weather", {"name": "get_weather", "description": "Weather of a city today.",
                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}})
CLOCK = Tool("local_time", {"name": "local_time", "parameters": {"type": "object", "properties": {}}})
PARIS, LYON = ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("local_time", "{}")
TOOL_CONVERSATIONS = {
    "one call": (SYSTEM, Message("user", "Weather in Paris?"), Message("assistant", "", None, (PARIS,)),
                 Message("tool", "18 C, sunny"), Message("assistant", "18 C and sunny.")),
    "two calls, two results": (Message("user", "Weather and time?"), Message("assistant", "", None, (PARIS, LYON)),
                               Message("tool", "18 C"), Message("tool", "14:05"),
                               Message("assistant", "18 C at 14:05."), Message("user", "Thanks"), ANSWER),
    "text with the call": (Message("user", "Weather in Paris?"), Message("assistant", "Checking.", None, (PARIS,)),
                           Message("tool", "18 C"), Message("assistant", "18 C.")),
    "the call is the target": (SYSTEM, Message("user", "Weather in Paris?"), Message("assistant", "", None, (PARIS,))),
}
# What each public template renders like dsft, and what not (deepseek_layouts' docstring says why):
TOOL_PARITY = {
    "deepseek-r1.jinja": {"one call", "text with the call", "the call is the target"},  # it joins results without \n
    # R1-Distill's renders a call-only turn also as an empty answer: it tests content against none, and transformers
    # drops a null content, so it sees "" (the V3 template has the same test, and V3's other faults besides).
    "deepseek-v3-0324.jinja": set(TOOL_CONVERSATIONS),
    "deepseek-v3.1.jinja": set(TOOL_CONVERSATIONS),
}


def official_with_tools(tokenizer, copy: str, messages, template: str, generation: bool, thinking=None) -> str:
    # The DeepSeek templates ignore a tools argument: the tools reach them in the system prompt dsft writes.
    system = messages[0].content if messages[0].role == "system" else ""
    body = messages[1:] if messages[0].role == "system" else messages
    chat = [{"role": "system", "content": tool_system_prompt(system, (WEATHER, CLOCK), template)}]
    for m in body:
        entry = {"role": m.role, "content": m.content}
        if m.tool_calls:  # a call-only turn has content "": transformers drops a null content, which they index
            entry = {"role": "assistant", "content": m.content, "tool_calls": [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]}
        chat.append(entry)
    variables = {} if thinking is None else {"thinking": thinking}
    return tokenizer.apply_chat_template(chat, chat_template=(COPIES / copy).read_text("utf-8"), tokenize=False,
                                         add_generation_prompt=generation, **variables)


@pytest.mark.parametrize("copy, name", [(c, n) for c, names in TOOL_PARITY.items() for n in sorted(names)])
def test_tool_conversations_equal_the_official_template(tokenizer, copy, name):
    template, messages, tools = OFFICIAL[copy], TOOL_CONVERSATIONS[name], (WEATHER, CLOCK)
    thinking = False if template == "deepseek_v31" else None
    for end in range(1, len(messages) + 1):  # every prompt along the conversation
        if messages[end - 1].role in ("user", "tool") and (end == len(messages) or messages[end].role == "assistant"):
            text, ids = text_and_ids(render_prompt(messages[:end], template, tokenizer, thinking, tools), tokenizer)
            expected = official_with_tools(tokenizer, copy, messages[:end], template, True, thinking)
            assert text == expected, end
            assert ids == ids_of(expected, tokenizer)
    if template != "deepseek_r1":  # R1's prompt opens a think block its finished turns do not show
        whole = render_conversation(messages, template, tokenizer, "assistant", thinking, tools=tools)
        assert "".join(s.text for s in whole) == official_with_tools(tokenizer, copy, messages, template, False, thinking)


def test_loss_falls_on_calls_and_answers_never_on_tool_results(tokenizer):
    messages = TOOL_CONVERSATIONS["two calls, two results"]
    segments = render_conversation(messages, "deepseek_v31", tokenizer, "assistant", tools=(WEATHER, CLOCK))
    trained = [s.text for s in segments if s.trainable]
    assert trained == [
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>'
        "<｜tool▁call▁begin｜>local_time<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>",
        "18 C at 14:05.<｜end▁of▁sentence｜>", "500 mg every 8 hours.<｜end▁of▁sentence｜>"]
    assert not any("18 C<" in s.text or "14:05<" in s.text for s in segments if s.trainable)


def test_v31_calls_tools_in_non_thinking_mode_only(tokenizer):
    messages = TOOL_CONVERSATIONS["the call is the target"]
    with pytest.raises(DsftError, match="deepseek_v31 calls tools in non-thinking mode only"):
        render_conversation(messages, "deepseek_v31", tokenizer, "assistant", thinking=True, tools=(WEATHER,))
    auto = render_conversation(messages, "deepseek_v31", tokenizer, "assistant", tools=(WEATHER,))
    assert [s.text for s in auto if not s.trainable][-1].endswith("<｜Assistant｜></think>")


def test_v3s_original_template_loses_the_calls(tokenizer):
    # Why deepseek_v3 renders tools as R1's and V3-0324's templates do (deepseek_layouts): V3's own renders calls
    # only for a null content, which transformers drops, so a call-only turn renders as an empty answer, the call
    # gone (and with a null content it would leave a single call's list unclosed).
    text = official_with_tools(tokenizer, "deepseek-v3.jinja", TOOL_CONVERSATIONS["one call"], "deepseek_v3", False)
    turns = text.split("<｜User｜>", 1)[1]  # after the system prompt, whose call format shows the markers
    assert "<｜Assistant｜><｜end▁of▁sentence｜>" in turns and "get_weather" not in turns
    ours = render_conversation(TOOL_CONVERSATIONS["one call"], "deepseek_v3", tokenizer, "assistant", tools=(WEATHER,))
    assert "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>" in "".join(s.text for s in ours)
