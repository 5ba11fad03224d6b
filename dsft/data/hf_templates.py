"""Jinja twins of the built-in DeepSeek templates, saved with a run's tokenizer.

With them, `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` in plain
transformers (or any server that reads the tokenizer's template, vLLM and SGLang included) renders
the prompt text that dsft trained on; tests/unit/test_chat_parity.py checks that each twin renders
as its built-in template. Like DeepSeek's own templates, the R1 and V3.1 twins drop inline reasoning
from history turns (dsft keeps reasoning in its own field, so its rendering needs no such step), the
V3 twin renders content as given, and the V3.1 twin reads the variable thinking (false by default).
"""

from __future__ import annotations

_STRIP_THINK = "{% if '</think>' in answer %}{% set answer = answer.split('</think>')[-1].lstrip() %}{% endif %}"
_V31_PROMPT = "<｜Assistant｜>{% if thinking is defined and thinking %}<think>{% else %}</think>{% endif %}"


def _template(after_user: str, before_answer: str, answer_filter: str, generation_prompt: str) -> str:
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] + '" + after_user + "' }}"
        "{% elif message['role'] == 'assistant' %}{% set answer = message['content'] %}"
        + answer_filter
        + "{{ '" + before_answer + "' + answer + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}" + generation_prompt + "{% endif %}"
    )


JINJA_TEMPLATES = {
    "deepseek_v3": _template("", "<｜Assistant｜>", "", "<｜Assistant｜>"),
    "deepseek_r1": _template("", "<｜Assistant｜>", _STRIP_THINK, "<｜Assistant｜><think>\n"),
    "deepseek_r1_0528": _template("<｜Assistant｜>", "", _STRIP_THINK, ""),
    "deepseek_v31": _template("", "<｜Assistant｜></think>", _STRIP_THINK, _V31_PROMPT),
}
