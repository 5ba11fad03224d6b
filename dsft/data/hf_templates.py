"""Jinja twins of the built-in DeepSeek templates, saved with a run's tokenizer.

With them, `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` in plain
transformers (or any server that reads the tokenizer's template) renders the prompt text that
dsft trained on; a test checks the two agree. Like DeepSeek-R1's own template, the R1 twin drops
inline reasoning from history turns (dsft keeps reasoning in its own field, so its rendering
needs no such step); the V3 twin, like DeepSeek-V3's, renders content as given.
"""

from __future__ import annotations

_STRIP_THINK = "{% if '</think>' in answer %}{% set answer = answer.split('</think>')[-1].lstrip() %}{% endif %}"


def _template(answer_filter: str, generation_prompt: str) -> str:
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{% set answer = message['content'] %}"
        + answer_filter
        + "{{ '<｜Assistant｜>' + answer + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + generation_prompt + "' }}{% endif %}"
    )


JINJA_TEMPLATES = {
    "deepseek_v3": _template("", "<｜Assistant｜>"),
    "deepseek_r1": _template(_STRIP_THINK, "<｜Assistant｜><think>\\n"),
}
