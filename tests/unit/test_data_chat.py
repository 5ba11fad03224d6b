"""Rendering: exact DeepSeek strings, loss masks, template resolution and train/generation identity."""

import pytest

from dsft.data.chat import (
    Segment,
    render_conversation,
    render_prompt,
    render_text,
    resolve_template,
)
from dsft.data.encode import IGNORE_INDEX, encode_segments
from dsft.data.formats import Message
from dsft.errors import DsftError
from dsft.data.tokenizer import ASSISTANT, BOS, EOS, USER

# A prefix-consistent template that is not DeepSeek's: turn boundaries come from prefix renders.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Like DeepSeek-R1's own template: it cuts the reasoning out of assistant content.
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "<｜Assistant｜>{{ content }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)

CONVERSATION = (
    Message("system", "You are exact."),
    Message("user", "What is 2+2?"),
    Message("assistant", "4", reasoning="two and two"),
    Message("user", "And 6*7? 请回答"),
    Message("assistant", "42", reasoning="six sevens"),
)


def _labelled_spans(tokenizer, segments):
    """Decoded text of each run of consecutive trainable tokens."""
    input_ids, labels = encode_segments(segments, tokenizer)
    spans, current = [], []
    for token_id, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token_id
            current.append(token_id)
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


def test_deepseek_v3_segments(tokenizer):
    assert render_conversation(CONVERSATION, "deepseek_v3", tokenizer, "assistant") == [
        Segment(f"{BOS}You are exact.", False),
        Segment(f"{USER}What is 2+2?", False),
        Segment(ASSISTANT, False),
        Segment(f"4{EOS}", True),
        Segment(f"{USER}And 6*7? 请回答", False),
        Segment(ASSISTANT, False),
        Segment(f"<think>\nsix sevens\n</think>\n\n42{EOS}", True),
    ]


def test_deepseek_r1_segments(tokenizer):
    assert render_conversation(CONVERSATION, "deepseek_r1", tokenizer, "assistant") == [
        Segment(f"{BOS}You are exact.", False),
        Segment(f"{USER}What is 2+2?", False),
        Segment(ASSISTANT, False),
        Segment(f"4{EOS}", True),
        Segment(f"{USER}And 6*7? 请回答", False),
        Segment(f"{ASSISTANT}<think>\n", False),
        Segment(f"six sevens\n</think>\n\n42{EOS}", True),
    ]


def test_deepseek_r1_without_reasoning_trains_an_empty_think_block(tokenizer):
    messages = (Message("user", "hi"), Message("assistant", "hello"))
    segments = render_conversation(messages, "deepseek_r1", tokenizer, "assistant")
    assert "".join(segment.text for segment in segments) == f"{BOS}{USER}hi{ASSISTANT}<think>\n\n</think>\n\nhello{EOS}"


def test_deepseek_v3_without_reasoning_has_no_think_block(tokenizer):
    messages = (Message("user", "hi"), Message("assistant", "hello"))
    segments = render_conversation(messages, "deepseek_v3", tokenizer, "assistant")
    assert "".join(segment.text for segment in segments) == f"{BOS}{USER}hi{ASSISTANT}hello{EOS}"


def test_prompts(tokenizer):
    history = CONVERSATION[:-1]
    common = f"{BOS}You are exact.{USER}What is 2+2?{ASSISTANT}4{EOS}{USER}And 6*7? 请回答"
    assert "".join(s.text for s in render_prompt(history, "deepseek_v3", tokenizer)) == f"{common}{ASSISTANT}"
    r1_prompt = render_prompt(history, "deepseek_r1", tokenizer)
    assert "".join(s.text for s in r1_prompt) == f"{common}{ASSISTANT}<think>\n"
    assert not any(segment.trainable for segment in r1_prompt)


@pytest.mark.parametrize(
    ("template", "loss_on", "spans"),
    [
        ("deepseek_v3", "assistant", [f"4{EOS}", f"<think>\nsix sevens\n</think>\n\n42{EOS}"]),
        ("deepseek_v3", "final_assistant", [f"<think>\nsix sevens\n</think>\n\n42{EOS}"]),
        ("deepseek_r1", "assistant", [f"4{EOS}", f"six sevens\n</think>\n\n42{EOS}"]),
        ("deepseek_r1", "final_assistant", [f"six sevens\n</think>\n\n42{EOS}"]),
        (
            "deepseek_r1",
            "all",
            [
                f"{BOS}You are exact.{USER}What is 2+2?{ASSISTANT}4{EOS}{USER}And 6*7? 请回答"
                f"{ASSISTANT}<think>\nsix sevens\n</think>\n\n42{EOS}"
            ],
        ),
    ],
)
def test_label_masks(tokenizer, template, loss_on, spans):
    assert _labelled_spans(tokenizer, render_conversation(CONVERSATION, template, tokenizer, loss_on)) == spans


def test_single_turn_label_is_the_answer_and_eos(tokenizer):
    messages = (Message("user", "What is 6*7?"), Message("assistant", "42"))
    segments = render_conversation(messages, "deepseek_v3", tokenizer, "assistant")
    assert _labelled_spans(tokenizer, segments) == [f"42{EOS}"]


def test_encode_segments_encodes_each_segment_without_added_special_tokens(tokenizer):
    segments = [Segment(f"{BOS}hi", False), Segment(f"42{EOS}", True)]
    input_ids, labels = encode_segments(segments, tokenizer)
    first = tokenizer(f"{BOS}hi", add_special_tokens=False)["input_ids"]
    second = tokenizer(f"42{EOS}", add_special_tokens=False)["input_ids"]
    assert input_ids == first + second
    assert labels == [IGNORE_INDEX] * len(first) + second
    assert input_ids[0] == tokenizer.bos_token_id and input_ids.count(tokenizer.bos_token_id) == 1
    assert encode_segments([], tokenizer) == ([], [])


def test_render_text(tokenizer):
    assert render_text("Once upon a time.", tokenizer) == [
        Segment(BOS, True),
        Segment("Once upon a time.", True),
        Segment(EOS, True),
    ]


def test_tokenizer_template_segments_and_masks(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", PLAIN_TEMPLATE)
    segments = render_conversation(CONVERSATION, "tokenizer", tokenizer, "assistant")
    assert segments == [
        Segment(f"{BOS}<|system|>\nYou are exact.{EOS}\n<|user|>\nWhat is 2+2?{EOS}\n<|assistant|>\n", False),
        Segment(f"4{EOS}\n", True),
        Segment(f"<|user|>\nAnd 6*7? 请回答{EOS}\n<|assistant|>\n", False),
        Segment(f"<think>\nsix sevens\n</think>\n\n42{EOS}\n", True),
    ]
    history = [{"role": m.role, "content": m.content} for m in CONVERSATION[:-1]]
    expected_prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert "".join(s.text for s in render_prompt(CONVERSATION[:-1], "tokenizer", tokenizer)) == expected_prompt


@pytest.mark.parametrize("template", ["deepseek_v3", "deepseek_r1", "deepseek_r1_0528", "deepseek_v31", "tokenizer"])
def test_prompt_tokens_equal_training_tokens_before_the_final_target(tokenizer, monkeypatch, template):
    monkeypatch.setattr(tokenizer, "chat_template", PLAIN_TEMPLATE)
    # The final turn has reasoning, so V3.1 trains it in thinking mode: the prompt of that mode.
    thinking = True if template == "deepseek_v31" else None
    prompt = render_prompt(CONVERSATION[:-1], template, tokenizer, thinking)
    prompt_ids, prompt_labels = encode_segments(prompt, tokenizer)
    final_only = render_conversation(CONVERSATION, template, tokenizer, "final_assistant")
    input_ids, labels = encode_segments(final_only, tokenizer)
    first_label = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert input_ids[:first_label] == prompt_ids
    assert set(prompt_labels) == {IGNORE_INDEX}
    # With loss on every assistant turn the split points are the same, so the identity holds too.
    every_turn = render_conversation(CONVERSATION, template, tokenizer, "assistant")
    all_ids, all_labels = encode_segments(every_turn, tokenizer)
    assert all_ids == input_ids
    assert all_labels[len(prompt_ids)] != IGNORE_INDEX and all_labels[len(prompt_ids) - 1] == IGNORE_INDEX


def test_resolve_template(tokenizer, monkeypatch):
    assert resolve_template("auto", tokenizer) == "deepseek_v3"
    assert resolve_template("deepseek_r1", tokenizer) == "deepseek_r1"
    with pytest.raises(DsftError, match="data.chat_template is 'tokenizer' but the tokenizer has no chat template"):
        resolve_template("tokenizer", tokenizer)
    monkeypatch.setattr(tokenizer, "chat_template", R1_TEMPLATE)
    assert resolve_template("auto", tokenizer) == "deepseek_r1"
    monkeypatch.setattr(tokenizer, "chat_template", PLAIN_TEMPLATE)
    assert resolve_template("auto", tokenizer) == "tokenizer"
    assert resolve_template("deepseek_v3", tokenizer) == "deepseek_v3"


def test_tokenizer_template_that_drops_reasoning(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", R1_TEMPLATE)
    # R1's generation prompt opens a think block that the full render lacks: not prefix-consistent.
    with pytest.raises(DsftError, match=r"not prefix-consistent.*set data.chat_template to a built-in template \(deepseek_v3, "):
        render_conversation(CONVERSATION, "tokenizer", tokenizer, "assistant")
    monkeypatch.setattr(tokenizer, "chat_template", R1_TEMPLATE.replace("<think>\n", ""))
    with pytest.raises(DsftError, match=r"drops the reasoning of the final assistant turn; set .*deepseek_r1, .* or data.reasoning: drop$"):
        render_conversation(CONVERSATION, "tokenizer", tokenizer, "assistant")


def test_tokenizer_template_that_raises(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DsftError, match="chat template failed on this conversation: roles must alternate"):
        render_conversation(CONVERSATION, "tokenizer", tokenizer, "assistant")


def test_conversation_must_end_with_assistant(tokenizer):
    with pytest.raises(DsftError, match="must end with an assistant message"):
        render_conversation(CONVERSATION[:-1], "deepseek_v3", tokenizer, "assistant")
