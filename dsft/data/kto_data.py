"""KTO data (unpaired preferences) to token ids: a conversation whose final assistant answer is labelled
desirable (label true) or undesirable (label false), in any of dsft's chat formats (messages, sharegpt, alpaca);
TRL's own layout {"prompt", "completion", "label"} with strings reads as alpaca's instruction and output.

Each row renders as SFT and generation render (the prompt through the run's template, the answer as the final
turn: preference_data.encode_answer) and is TRL's KTO layout {"prompt_ids", "completion_ids", "label"}, with
"KL_completion_ids": the completion of the row before it within each group of batch_size rows (the last row's for
the first), the mismatched prompt and answer KTO estimates its KL term from, as TRL builds them.

Nothing is dropped silently: skipped records, truncated and dropped rows are counted in DataStats.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsft.data.dataset import DataStats, load_splits
from dsft.data.formats import Message, detect_format, to_example
from dsft.data.preference_data import encode_answer
from dsft.data.read import RawRecord, json_type
from dsft.errors import DsftError

if TYPE_CHECKING:
    from dsft.config import DataConfig


@dataclass(frozen=True)
class LabelledAnswer:
    source: str
    prompt: tuple[Message, ...]
    answer: Message
    desirable: bool


def to_labelled(record: RawRecord, system_prompt: str | None = None) -> LabelledAnswer:
    """Validate one KTO record; raises DsftError naming the record and field."""
    label = record.data.get("label")
    if not isinstance(label, bool):
        got = "missing" if label is None else f"{json_type(label)}"
        raise DsftError(f"{record.source}: field 'label': a KTO record needs label true (a desirable answer) or "
                        f"false (an undesirable one), got {got}")
    data = {key: value for key, value in record.data.items() if key != "label"}
    if isinstance(data.get("prompt"), str) and isinstance(data.get("completion"), str) and "instruction" not in data:
        data["instruction"], data["output"] = data.pop("prompt"), data.pop("completion")  # TRL's unpaired layout
    unlabelled = RawRecord(data, record.source)
    *prompt, answer = to_example(unlabelled, detect_format(unlabelled), system_prompt).messages
    if not prompt or answer.role != "assistant":
        raise DsftError(f"{record.source}: a KTO record is a prompt and the assistant answer its label judges")
    return LabelledAnswer(record.source, tuple(prompt), answer, label)


def labelled_texts(answers: Sequence[LabelledAnswer]) -> Iterator[str]:
    """Every string of the records, for training a preset's tokenizer."""
    for item in answers:
        for message in (*item.prompt, item.answer):
            yield message.content
            if message.reasoning:
                yield message.reasoning


def build_kto_datasets(data: DataConfig, template: str, tokenizer, seed: int,
                       batch_size: int) -> tuple[list[dict], list[dict], DataStats]:
    """Training and validation rows (see the module docstring) and their stats; raises DsftError for bad data, a
    template that cannot render a record, or when no row is left."""
    stats = DataStats()
    train, validation = load_splits(data, lambda record: to_labelled(record, data.system_prompt), stats, seed)
    train_rows = with_kl_completions(_encode(train, data, template, tokenizer, stats), batch_size)
    validation_rows = with_kl_completions(_encode(validation, data, template, tokenizer, stats), batch_size)
    stats.train_examples, stats.validation_examples = len(train_rows), len(validation_rows)
    stats.trainable_tokens = sum(len(row["completion_ids"]) for row in train_rows)
    stats.train_tokens = stats.trainable_tokens + sum(len(row["prompt_ids"]) for row in train_rows)
    if not train_rows:
        summary = "\n".join(f"  {line}" for line in stats.lines())
        raise DsftError(f"no KTO records left from data.train_files:\n{summary}")
    return train_rows, validation_rows, stats


def _encode(answers: Sequence[LabelledAnswer], data: DataConfig, template: str, tokenizer, stats: DataStats) -> list[dict]:
    rows = []
    for item in answers:
        try:
            prompt_ids, completion_ids = encode_answer(item.prompt, item.answer, template, tokenizer,
                                                       data.thinking_mode, data.reasoning)
        except DsftError as exc:
            raise DsftError(f"{item.source}: {exc}") from None
        budget_tokens = data.max_length_tokens - len(prompt_ids)
        too_long = len(completion_ids) > budget_tokens
        if too_long and data.truncation == "drop":
            stats.dropped_too_long += 1
            continue
        if budget_tokens <= 0:  # the prompt alone fills the budget: no answer token to judge
            stats.dropped_no_target += 1
            continue
        stats.truncated += too_long
        rows.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids[:budget_tokens],
                     "label": item.desirable})
    return rows


def with_kl_completions(rows: list[dict], batch_size: int) -> list[dict]:
    """rows with KL_completion_ids: within each group of batch_size rows, each row's is the completion of the row
    before it (the group's last for its first), so the KL term sees answers to other prompts."""
    out = []
    for start in range(0, len(rows), batch_size):
        group = rows[start:start + batch_size]
        out += [{**row, "KL_completion_ids": group[i - 1]["completion_ids"]} for i, row in enumerate(group)]
    return out
