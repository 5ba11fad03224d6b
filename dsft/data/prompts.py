"""Prompts for the RL stages (grpo, ppo): chat records rendered exactly as SFT and generation render them.

Any chat format works; a record's final assistant turn (alpaca output) is the reference answer that
rewards such as accuracy compare against, and a record ending with a user turn is a prompt without one.
The token ids come from render_prompt + encode_segments, the functions behind `dsft generate`'s prompt_ids,
so the policy continues the very tokens it was fine-tuned on.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsft.config import DataConfig
from dsft.data.chat import render_prompt
from dsft.data.columns import FieldMap
from dsft.data.dataset import DataStats, load_examples, split_prompt_reference_optional
from dsft.data.encode import encode_segments
from dsft.data.formats import Message
from dsft.errors import DsftError


@dataclass(frozen=True)
class RlPrompt:
    messages: tuple[Message, ...]
    """The conversation up to the turn the policy answers."""
    reference: str | None
    """The reference answer (reasoning removed), or None."""
    text: str
    """The rendered prompt, generation prompt included."""
    ids: tuple[int, ...]
    """Token ids of text, encoded segment by segment as in training."""

    @property
    def question(self) -> str:
        """The last user message (what reward functions receive as the prompt)."""
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else ""


def load_rl_prompts(data: DataConfig, tokenizer, template: str, stats: DataStats) -> list[RlPrompt]:
    """The prompts of data.train_files, rendered with template in data.thinking's mode (a record's own thinking
    wins; auto: the template's default); prompts over data.max_length_tokens are left
    out and counted in stats.dropped_too_long.

    Raises DsftError for text records (they hold no prompt), for a config that asks for validation data
    (RL stages measure held-out prompts through eval.generate_files) and when no prompt remains; raises
    as load_examples does for bad records.
    """
    if data.validation_files or data.validation_ratio:
        raise DsftError("data.validation_files / data.validation_ratio: the RL stages hold no validation loss; "
                        "put held-out prompts with answers in eval.generate_files")
    examples = load_examples(data.train_files, data.format, data.on_error, stats, data.system_prompt,
                             data.max_samples, require_answer=False, fields=FieldMap.of(data))
    prompts: list[RlPrompt] = []
    for example in examples:
        messages, reference = split_prompt_reference_optional(example)
        thinking = data.thinking_mode if example.thinking is None else example.thinking
        segments = render_prompt(messages, template, tokenizer, thinking, example.tools)
        ids, _ = encode_segments(segments, tokenizer)
        if len(ids) > data.max_length_tokens:
            stats.dropped_too_long += 1
            continue
        prompts.append(RlPrompt(tuple(messages), reference, "".join(s.text for s in segments), tuple(ids)))
        stats.train_tokens += len(ids)
    stats.train_examples = len(prompts)
    if not prompts:
        raise DsftError(f"data.train_files: no prompt of at most data.max_length_tokens ({data.max_length_tokens}) tokens")
    return prompts


def prompt_texts(data: DataConfig):
    """Every string of the prompt data (messages and references), for training a preset's tokenizer."""
    stats = DataStats()
    for example in load_examples(data.train_files, data.format, data.on_error, stats, data.system_prompt,
                                 data.max_samples, require_answer=False, fields=FieldMap.of(data)):
        for message in example.messages:
            yield message.content
            if message.reasoning:
                yield message.reasoning
