"""Render conversations to text segments, each marked as carrying loss or not.

The built-in DeepSeek templates are plain Python; "tokenizer" uses the tokenizer's own jinja
chat template and recovers turn boundaries by rendering growing prefixes of the conversation.

The training render of a conversation is built from the very pieces `render_prompt` returns for
its history, so the tokens a model is trained to continue are exactly the tokens `dsft generate`
gives it; segments are encoded one by one, so equal segments mean equal token ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from dsft.data.formats import Message
from dsft.data.tokenizer import ASSISTANT, THINK_CLOSE, THINK_OPEN, USER
from dsft.errors import DsftError

TEMPLATES = ("deepseek_v3", "deepseek_r1", "tokenizer")
LOSS_ON = ("assistant", "final_assistant", "all")

_GENERATION_PROMPTS = {"deepseek_v3": ASSISTANT, "deepseek_r1": f"{ASSISTANT}{THINK_OPEN}\n"}
# DeepSeek-R1's own template removes reasoning with content.split('</think>'); rendered through
# it, a training target would lose its chain of thought.
_STRIPS_REASONING = re.compile(r"""\.split\(\s*['"]</think>['"]\s*\)""")


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

    auto: deepseek_r1 when the tokenizer's own template is DeepSeek-R1-style (it strips reasoning
    with split('</think>') and uses the DeepSeek markers), else tokenizer when it has a template,
    else deepseek_v3. Raises DsftError for "tokenizer" when the tokenizer has no chat template,
    ValueError for a name that is not auto or one of TEMPLATES.
    """
    own_template = getattr(tokenizer, "chat_template", None)
    if name in ("deepseek_v3", "deepseek_r1"):
        return name
    if name == "tokenizer":
        if own_template is None:
            raise DsftError(
                "data.chat_template is 'tokenizer' but the tokenizer has no chat template; "
                "use auto, deepseek_v3 or deepseek_r1"
            )
        return name
    if name != "auto":
        raise ValueError(f"unknown chat template {name!r}; allowed: auto, {', '.join(TEMPLATES)}")
    if own_template is None:
        return "deepseek_v3"
    if isinstance(own_template, str) and _STRIPS_REASONING.search(own_template) and ASSISTANT in own_template:
        return "deepseek_r1"
    return "tokenizer"


def render_conversation(messages: Sequence[Message], template: str, tokenizer, loss_on: str) -> list[Segment]:
    """Render a conversation ending with the assistant turn to train on.

    loss_on: "assistant" trains every assistant answer (with its end-of-turn text), "final_assistant"
    only the last one, "all" every token. Reasoning of earlier assistant turns is left out (as the
    DeepSeek templates do); the final turn's reasoning is part of its target. Empty segments are
    omitted. Raises DsftError when the conversation does not end with an assistant turn or the
    tokenizer's template cannot be split into turns; ValueError for an unknown template or loss_on.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"unknown loss_on {loss_on!r}; allowed: {', '.join(LOSS_ON)}")
    if not messages or messages[-1].role != "assistant":
        raise DsftError("a conversation to train on must end with an assistant message")
    final = len(messages) - 1
    # The final turn's prompt is rendered by the function render_prompt uses: train/generation identity.
    pieces = _prompt_pieces(messages[:-1], template, tokenizer)
    if template == "tokenizer":
        prompt = "".join(piece.text for piece in pieces)
        pieces.append(_Piece(_template_final_target(messages, prompt, tokenizer), final))
    else:
        pieces.append(_Piece(_builtin_final_target(messages[-1], template, tokenizer), final))
    return [Segment(piece.text, _is_trainable(piece, loss_on, final)) for piece in pieces if piece.text]


def render_prompt(messages: Sequence[Message], template: str, tokenizer) -> list[Segment]:
    """Render a conversation history (normally ending with a user turn) plus the generation prompt.

    All segments are non-trainable; their concatenation is the text a model continues. Raises like
    render_conversation.
    """
    return [Segment(piece.text, False) for piece in _prompt_pieces(messages, template, tokenizer) if piece.text]


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


def _prompt_pieces(messages: Sequence[Message], template: str, tokenizer) -> list[_Piece]:
    if template == "tokenizer":
        return _template_prompt_pieces(messages, tokenizer)
    if template in _GENERATION_PROMPTS:
        return _builtin_prompt_pieces(messages, template, tokenizer)
    raise ValueError(f"unknown chat template {template!r}; allowed: {', '.join(TEMPLATES)}")


def _builtin_prompt_pieces(messages: Sequence[Message], template: str, tokenizer) -> list[_Piece]:
    eos = _eos(tokenizer)
    has_system = bool(messages) and messages[0].role == "system"
    pieces = [_Piece(_bos(tokenizer) + (messages[0].content if has_system else ""), None)]
    for i in range(1 if has_system else 0, len(messages)):
        message = messages[i]
        if message.role == "user":
            pieces.append(_Piece(USER + message.content, None))
        elif message.role == "assistant":
            # Only the answer of an earlier turn: DeepSeek models never see past reasoning.
            pieces += [_Piece(ASSISTANT, None), _Piece(message.content + eos, i)]
        else:
            raise DsftError(f"message {i}: a {message.role} message is only allowed first")
    pieces.append(_Piece(_GENERATION_PROMPTS[template], None))
    return pieces


def _builtin_final_target(message: Message, template: str, tokenizer) -> str:
    eos = _eos(tokenizer)
    reasoning = message.reasoning
    if template == "deepseek_r1":
        # The generation prompt already opened the think block; no reasoning gives an empty one.
        return f"{'' if reasoning is None else reasoning}\n{THINK_CLOSE}\n\n{message.content}{eos}"
    if reasoning is None:
        return message.content + eos
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{message.content}{eos}"


def _template_prompt_pieces(messages: Sequence[Message], tokenizer) -> list[_Piece]:
    """Prompt and answer pieces of every assistant turn, by the prefix difference of renders.

    Turn i's prompt is render(messages[:i], generation prompt) minus what was rendered before it,
    its answer render(messages[:i + 1]) minus that prompt.
    """
    chat = _chat_dicts(messages)
    pieces, rendered = [], ""
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = _apply_template(tokenizer, chat[:i], add_generation_prompt=True)
        full = _apply_template(tokenizer, chat[: i + 1], add_generation_prompt=False)
        pieces += [_Piece(_after_prefix(rendered, prompt), None), _Piece(_after_prefix(prompt, full), i)]
        rendered = full
    generation_prompt = _apply_template(tokenizer, chat, add_generation_prompt=True)
    pieces.append(_Piece(_after_prefix(rendered, generation_prompt), None))
    return pieces


def _template_final_target(messages: Sequence[Message], prompt: str, tokenizer) -> str:
    """The final turn's target: its full render minus prompt, the render of the history with the generation prompt."""
    final = messages[-1]
    content = final.content
    if final.reasoning is not None:
        content = f"{THINK_OPEN}\n{final.reasoning}\n{THINK_CLOSE}\n\n{final.content}"
    chat = _chat_dicts(messages[:-1])
    full = _apply_template(tokenizer, [*chat, {"role": "assistant", "content": content}], add_generation_prompt=False)
    target = _after_prefix(prompt, full)
    if final.reasoning is not None and final.reasoning not in target:
        raise DsftError(
            "the tokenizer's chat template drops the reasoning of the final assistant turn; "
            "set data.chat_template to deepseek_r1"
        )
    return target


def _chat_dicts(messages: Sequence[Message]) -> list[dict]:
    # Only answers: earlier turns' reasoning stays out of the history, as in the built-in templates.
    return [{"role": message.role, "content": message.content} for message in messages]


def _apply_template(tokenizer, chat: list[dict], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise DsftError(f"the tokenizer's chat template failed on this conversation: {exc}") from None


def _after_prefix(prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise DsftError(
            "the tokenizer's chat template is not prefix-consistent (rendering one more turn changes "
            "the text before it); set data.chat_template to deepseek_v3 or deepseek_r1"
        )
    return text[len(prefix) :]


def _bos(tokenizer) -> str:
    return "" if tokenizer.bos_token is None else tokenizer.bos_token


def _eos(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise DsftError("the tokenizer has no eos_token; every rendered turn and document must end with one")
    return tokenizer.eos_token
