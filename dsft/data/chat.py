"""Render conversations to text segments, each marked as carrying loss or not.

The built-in DeepSeek templates are plain Python, token for token the models' own jinja templates
(tests/unit/test_chat_parity.py renders both over copies of the public templates):
  deepseek_v3       DeepSeek-V3 and V2.5: <｜User｜>q<｜Assistant｜>a<eos>, prompt ends <｜Assistant｜>
  deepseek_r1       DeepSeek-R1 and R1-Distill: as V3, the prompt opens the think block (<｜Assistant｜><think>\n)
  deepseek_r1_0528  DeepSeek-R1-0528 (and V3-0324's layout): <｜User｜>q<｜Assistant｜> is the user turn, a<eos>
  deepseek_v31      DeepSeek-V3.1/V3.2 hybrid thinking: an answer opens with </think> (non-thinking), the
                    prompt ends <｜Assistant｜><think> in thinking mode, <｜Assistant｜></think> otherwise
"tokenizer" uses the tokenizer's own jinja chat template and recovers turn boundaries by rendering
growing prefixes of the conversation.

Thinking (deepseek_v31, and the template variable `thinking` of a tokenizer's own template): True or
False, or None for auto: in training a conversation thinks when its final turn has reasoning; a
prompt to generate from does not (the template's own default). deepseek_r1 and deepseek_r1_0528
always think, deepseek_v3 never switches: they refuse thinking they cannot give (check_thinking).
History turns never show their reasoning, as in every DeepSeek template.

The training render of a conversation is built from the very pieces `render_prompt` returns for
its history, so the tokens a model is trained to continue are exactly the tokens `dsft generate`
gives it; segments are encoded one by one, so equal segments mean equal token ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from dsft.data.deepseek_layouts import LAYOUTS, Layout, calls_text, tool_system_prompt
from dsft.data.formats import Message
from dsft.data.tokenizer import ASSISTANT, OUTPUT_END, THINK_CLOSE, THINK_OPEN, USER
from dsft.data.tools import Tool, tools_as_openai
from dsft.errors import DsftError

TEMPLATES = ("deepseek_v3", "deepseek_r1", "deepseek_r1_0528", "deepseek_v31", "tokenizer")
LOSS_ON = ("assistant", "final_assistant", "all")
REASONING = ("keep", "drop")


_LAYOUTS = LAYOUTS
_SPLITS_REASONING = re.compile(r"""\.split\(\s*['"]</think>['"]""")
"""DeepSeek-R1's template removes reasoning with content.split('</think>')."""
_USER_OPENS_ANSWER = re.compile(r"""'<｜User｜>'\s*\+\s*message\[['"]content['"]\]\s*\+\s*'<｜Assistant｜>'""")
"""DeepSeek-V3-0324 and R1-0528: the user turn ends with <｜Assistant｜>."""


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text and whether its tokens carry loss."""

    text: str
    trainable: bool


class _Piece(NamedTuple):
    text: str
    answer_of: int | None
    """Index of the assistant message whose answer this text is; None for prompt text."""


def resolve_template(name: str, tokenizer) -> str:
    """The template to render with, from data.chat_template: one of TEMPLATES.

    auto: the built-in template the tokenizer's own one is (recognise_template), else tokenizer when
    it has a template, else deepseek_v3. Raises DsftError for "tokenizer" when the tokenizer has no
    chat template, ValueError for a name that is not auto or one of TEMPLATES.
    """
    own_template = getattr(tokenizer, "chat_template", None)
    if name in _LAYOUTS:
        return name
    if name == "tokenizer":
        if own_template is None:
            raise DsftError(
                "data.chat_template is 'tokenizer' but the tokenizer has no chat template; "
                f"use auto or one of {', '.join(_LAYOUTS)}"
            )
        return name
    if name != "auto":
        raise ValueError(f"unknown chat template {name!r}; allowed: auto, {', '.join(TEMPLATES)}")
    if own_template is None:
        return "deepseek_v3"
    return (recognise_template(own_template) if isinstance(own_template, str) else None) or "tokenizer"


def recognise_template(source: str) -> str | None:
    """The built-in template a DeepSeek jinja template renders as, or None for any other template.

    V3.1/V3.2 open an answer with </think> and read the variable thinking; R1-0528 (and V3-0324)
    end the user turn with <｜Assistant｜>; R1 and R1-Distill split reasoning off at </think>; V3 and
    V2.5 use the DeepSeek markers without either. V3.1 is never taken for R1: it is tested first.
    """
    if USER not in source or ASSISTANT not in source:
        return None
    if ASSISTANT + THINK_CLOSE in source and "thinking" in source:
        return "deepseek_v31"
    if _USER_OPENS_ANSWER.search(source):
        return "deepseek_r1_0528"
    if _SPLITS_REASONING.search(source):
        return "deepseek_r1"
    return "deepseek_v3"


def check_thinking(template: str, thinking: bool | None, key: str = "data.thinking") -> None:
    """Raise DsftError (naming key) when a built-in template cannot give the thinking asked for."""
    if template in _LAYOUTS and thinking is not None and thinking not in _LAYOUTS[template].prompts:
        mode = "always thinks" if True in _LAYOUTS[template].prompts else "has no thinking mode"
        raise DsftError(f"{key}: {'on' if thinking else 'off'}, but {template} {mode}; "
                        "use auto, or deepseek_v31 (hybrid thinking)")


def shared_thinking(template: str, thinking: bool | None, answers: Sequence[Message]) -> bool | None:
    """One thinking mode for several answers to one prompt (a preference pair share their prompt): thinking, or
    under auto (None) thinking when any answer reasons and the template switches (deepseek_v31)."""
    if thinking is None and template == "deepseek_v31" and any(a.reasoning is not None for a in answers):
        return True
    return thinking


def render_conversation(messages: Sequence[Message], template: str, tokenizer, loss_on: str,
                        thinking: bool | None = None, reasoning: str = "keep",
                        tools: Sequence[Tool] = ()) -> list[Segment]:
    """Render a conversation ending with the assistant turn to train on.

    loss_on: "assistant" trains every assistant answer (with its end-of-turn text), "final_assistant"
    only the last one, "all" every token. Reasoning of earlier assistant turns is left out (as the
    DeepSeek templates do); the final turn's reasoning is part of its target, unless reasoning is
    "drop". thinking (see the module docstring): None thinks when the final turn has reasoning.
    tools: the declared tools (the built-ins describe them in the system prompt); tool results never
    carry loss, an assistant turn's calls do. Empty segments are omitted. Raises DsftError when the conversation does not end with an
    assistant turn, its reasoning would train in non-thinking mode, or the tokenizer's template
    cannot be split into turns; ValueError for an unknown template, loss_on or reasoning.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"unknown loss_on {loss_on!r}; allowed: {', '.join(LOSS_ON)}")
    if reasoning not in REASONING:
        raise ValueError(f"unknown reasoning {reasoning!r}; allowed: {', '.join(REASONING)}")
    if not messages or messages[-1].role != "assistant":
        raise DsftError("a conversation to train on must end with an assistant message")
    final = len(messages) - 1
    last = messages[-1]
    answer = last if reasoning == "keep" else Message("assistant", last.content, None, last.tool_calls)
    thinking = _final_thinking(template, thinking, answer, messages)
    # The final turn's prompt is rendered by the function render_prompt uses: train/generation identity.
    pieces = _prompt_pieces(messages[:-1], template, tokenizer, thinking, tools)
    if template == "tokenizer":
        prompt = "".join(piece.text for piece in pieces)
        target = _template_final_target(messages[:-1], answer, prompt, tokenizer, _variables(thinking, tools))
    else:
        after_tool = len(messages) > 1 and messages[-2].role == "tool"
        target = _builtin_final_target(answer, template, tokenizer, thinking, after_tool)
    pieces.append(_Piece(target, final))
    return [Segment(piece.text, _is_trainable(piece, loss_on, final)) for piece in pieces if piece.text]


def render_prompt(messages: Sequence[Message], template: str, tokenizer, thinking: bool | None = None,
                  tools: Sequence[Tool] = ()) -> list[Segment]:
    """Render a conversation history (normally ending with a user turn) plus the generation prompt.

    All segments are non-trainable; their concatenation is the text a model continues. thinking
    None: the template's default (deepseek_v31 does not think). Raises like render_conversation.
    """
    check_thinking(template, thinking)
    if thinking is None and template in _LAYOUTS:
        thinking = next(iter(_LAYOUTS[template].prompts))
    pieces = _prompt_pieces(messages, template, tokenizer, thinking, tools)
    return [Segment(piece.text, False) for piece in pieces if piece.text]


def _final_thinking(template: str, thinking: bool | None, answer: Message, messages: Sequence[Message]) -> bool | None:
    """Whether the final turn trains in thinking mode; raises DsftError for reasoning without it, and for tool use
    in V3.1's thinking mode (V3.1 calls tools in non-thinking mode only)."""
    check_thinking(template, thinking)
    if template == "tokenizer":
        return thinking
    prompts = _LAYOUTS[template].prompts
    uses_tools = any(m.tool_calls for m in messages)
    if len(prompts) == 2 and uses_tools and thinking:
        raise DsftError(f"{template} calls tools in non-thinking mode only; set data.thinking: auto or off "
                        "(or the record's thinking: false)")
    if thinking is None:
        thinking = (answer.reasoning is not None and not uses_tools) if len(prompts) == 2 else next(iter(prompts))
    if len(prompts) == 2 and not thinking and answer.reasoning is not None:
        raise DsftError(f"the final assistant turn has reasoning, which {template} trains only in thinking mode; "
                        "set data.thinking: on or auto (or the record's thinking: true), or data.reasoning: drop")
    return thinking


def render_text(text: str, tokenizer) -> list[Segment]:
    """A plain document for continued pre-training: [bos] + text + eos, all trainable.

    bos only when the tokenizer has one; raises DsftError when it has no eos token.
    """
    texts = [_bos(tokenizer), text, _eos(tokenizer)]
    return [Segment(piece, True) for piece in texts if piece]


def _is_trainable(piece: _Piece, loss_on: str, final: int) -> bool:
    if loss_on == "all":
        return True
    if loss_on == "assistant":
        return piece.answer_of is not None
    return piece.answer_of == final


def _prompt_pieces(messages: Sequence[Message], template: str, tokenizer, thinking: bool | None,
                   tools: Sequence[Tool]) -> list[_Piece]:
    if template == "tokenizer":
        return _template_prompt_pieces(messages, tokenizer, _variables(thinking, tools))
    if template in _LAYOUTS:
        return _builtin_prompt_pieces(messages, template, tokenizer, thinking, tools)
    raise ValueError(f"unknown chat template {template!r}; allowed: {', '.join(TEMPLATES)}")


def _builtin_prompt_pieces(messages: Sequence[Message], template: str, tokenizer, thinking: bool | None,
                           tools: Sequence[Tool]) -> list[_Piece]:
    layout: Layout = _LAYOUTS[template]
    eos = _eos(tokenizer)
    has_system = bool(messages) and messages[0].role == "system"
    system = tool_system_prompt(messages[0].content if has_system else "", tools, template)
    pieces, results = [_Piece(_bos(tokenizer) + system, None)], 0
    for i in range(1 if has_system else 0, len(messages)):
        message = messages[i]
        if message.role == "user":
            pieces.append(_Piece(USER + message.content + layout.after_user, None))
        elif message.role == "tool":
            opener = layout.tools.next_output if results else layout.tools.first_output
            pieces.append(_Piece(opener + message.content + OUTPUT_END, None))  # results never carry loss
            results += 1
        elif message.role == "assistant":
            # Only the answer of an earlier turn (and its calls): DeepSeek models never see past reasoning.
            opener = layout.tools.outputs_end if results else layout.before_answer
            answer = message.content + calls_text(message.tool_calls, layout.tools) + eos
            pieces += [_Piece(opener, None), _Piece(answer, i)]
            results = 0
        else:
            raise DsftError(f"message {i}: a {message.role} message is only allowed first")
    pieces.append(_Piece(layout.tools.outputs_end if results else layout.prompts[thinking], None))
    return pieces


def _builtin_final_target(message: Message, template: str, tokenizer, thinking: bool, after_tool: bool) -> str:
    """The final turn's text after its prompt. After tool results no think block is open (the templates answer
    right after them), so reasoning there is written inline, as V3 writes it."""
    eos = _eos(tokenizer)
    reasoning = message.reasoning
    body = message.content + calls_text(message.tool_calls, _LAYOUTS[template].tools)
    if template == "deepseek_r1" and not after_tool:
        # The generation prompt already opened the think block; no reasoning gives an empty one.
        return f"{'' if reasoning is None else reasoning}\n{THINK_CLOSE}\n\n{body}{eos}"
    if template == "deepseek_v31":
        # V3.1's thinking output: <think> (the prompt) reasoning </think> answer, no newlines between.
        return f"{reasoning or ''}{THINK_CLOSE}{body}{eos}" if thinking else body + eos
    if reasoning is None:
        return body + eos
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{body}{eos}"


def _template_prompt_pieces(messages: Sequence[Message], tokenizer, variables: dict) -> list[_Piece]:
    """Prompt and answer pieces of every assistant turn, by the prefix difference of renders.

    Turn i's prompt is render(messages[:i], generation prompt) minus what was rendered before it,
    its answer render(messages[:i + 1]) minus that prompt.
    """
    chat = _chat_dicts(messages)
    pieces, rendered = [], ""
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = _apply_template(tokenizer, chat[:i], True, variables)
        full = _apply_template(tokenizer, chat[: i + 1], False, variables)
        pieces += [_Piece(_after_prefix(rendered, prompt), None), _Piece(_after_prefix(prompt, full), i)]
        rendered = full
    generation_prompt = _apply_template(tokenizer, chat, True, variables)
    pieces.append(_Piece(_after_prefix(rendered, generation_prompt), None))
    return pieces


def _template_final_target(history: Sequence[Message], final: Message, prompt: str, tokenizer,
                           variables: dict) -> str:
    """The final turn's target: its full render minus prompt, the render of the history with the generation prompt."""
    content = final.content
    if final.reasoning is not None:
        content = f"{THINK_OPEN}\n{final.reasoning}\n{THINK_CLOSE}\n\n{final.content}"
    chat = [*_chat_dicts(history), *_chat_dicts([Message("assistant", content, None, final.tool_calls)])]
    target = _after_prefix(prompt, _apply_template(tokenizer, chat, False, variables))
    if final.reasoning is not None and final.reasoning not in target:
        raise DsftError(
            "the tokenizer's chat template drops the reasoning of the final assistant turn; set "
            f"data.chat_template to the built-in one of its model ({', '.join(_LAYOUTS)}) or data.reasoning: drop"
        )
    return target


def _chat_dicts(messages: Sequence[Message]) -> list[dict]:
    """OpenAI-style messages (tool calls included). Only answers: earlier turns' reasoning stays out of the
    history, as in the built-in templates."""
    chat = []
    for message in messages:
        entry = {"role": message.role, "content": message.content}
        if message.tool_calls:
            entry["tool_calls"] = [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                                   for call in message.tool_calls]
        chat.append(entry)
    return chat


def _variables(thinking: bool | None, tools: Sequence[Tool]) -> dict:
    """What apply_chat_template gets besides the messages: the variable thinking (V3.1's template reads it) and
    the declared tools in OpenAI's shape."""
    return {**({} if thinking is None else {"thinking": thinking}), **({"tools": tools_as_openai(tools)} if tools else {})}


def _apply_template(tokenizer, chat: list[dict], add_generation_prompt: bool, variables: dict) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **variables)
    except TemplateError as exc:
        raise DsftError(f"the tokenizer's chat template failed on this conversation: {exc}") from None


def _after_prefix(prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise DsftError(
            "the tokenizer's chat template is not prefix-consistent (rendering one more turn changes "
            f"the text before it); set data.chat_template to a built-in template ({', '.join(_LAYOUTS)})"
        )
    return text[len(prefix) :]


def _bos(tokenizer) -> str:
    return "" if tokenizer.bos_token is None else tokenizer.bos_token


def _eos(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise DsftError("the tokenizer has no eos_token; every rendered turn and document must end with one")
    return tokenizer.eos_token
