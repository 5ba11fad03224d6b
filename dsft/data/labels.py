"""Labelled text for sequence classification: read, validate, map labels to ids, tokenize, split.

A record holds a text field and a label field (a string or an integer). Bad records raise
DsftError naming file:line and the field, or with on_error skip are counted in DataStats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsft.data.dataset import DataStats, load_splits, load_validated
from dsft.data.read import RawRecord, json_type
from dsft.errors import DsftError

if TYPE_CHECKING:
    from dsft.config import ClassifyConfig, DataConfig


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    """The label as a string (an integer label 3 becomes "3")."""
    source: str
    """"path:LINE" of the record, for error messages."""


def text_of(record: RawRecord, text_field: str) -> str:
    """The record's text; raises DsftError naming file:line and the field when it is missing or not a string."""
    text = record.data.get(text_field)
    if not isinstance(text, str):
        found = "missing" if text_field not in record.data else f"a {json_type(text)}, not a string"
        raise DsftError(f"{record.source}: field {text_field!r} is {found}")
    return text


def to_labelled(record: RawRecord, text_field: str, label_field: str) -> LabelledText:
    """Validate one record; raises DsftError naming file:line and the field at fault."""
    text = text_of(record, text_field)
    label = record.data.get(label_field)
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        found = "missing" if label_field not in record.data else f"{label!r}, not a non-empty string or an integer"
        raise DsftError(f"{record.source}: field {label_field!r} is {found}")
    return LabelledText(text, str(label), record.source)


def load_labelled(files: Sequence[str], text_field: str, label_field: str, on_error: str, stats: DataStats,
                  max_samples: int | None = None) -> list[LabelledText]:
    """Read the labelled records of files in order (at most max_samples); on_error as in load_examples."""
    return load_validated(files, lambda record: to_labelled(record, text_field, label_field), on_error, stats, max_samples)


def label_names(labels: Sequence[str]) -> list[str]:
    """The sorted distinct labels (numerically when all are integers), whose positions are the class ids."""
    distinct = set(labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def balanced_class_weights(label_ids: Sequence[int], num_classes: int) -> list[float]:
    """n_samples / (n_classes x count_c) per class (sklearn's "balanced"); a class with no sample gets 1.0."""
    counts = [0] * num_classes
    for label_id in label_ids:
        counts[label_id] += 1
    total = len(label_ids)
    return [total / (num_classes * count) if count else 1.0 for count in counts]


def encode_labelled(records: Sequence[LabelledText], tokenizer, label2id: dict[str, int], data: DataConfig,
                    stats: DataStats) -> list[dict]:
    """Rows {"input_ids", "labels": class id}, fitted to data.max_length_tokens (truncated or dropped, counted)."""
    rows = []
    for record in records:
        # add_special_tokens: the tokenizer's own framing (a BOS first), as at prediction time.
        input_ids = tokenizer(record.text, add_special_tokens=True)["input_ids"]
        if len(input_ids) > data.max_length_tokens:
            if data.truncation == "drop":
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            input_ids = input_ids[: data.max_length_tokens]
        rows.append({"input_ids": input_ids, "labels": label2id[record.label]})
    return rows


def build_classify_datasets(data: DataConfig, classify: ClassifyConfig, tokenizer, seed: int):
    """(train rows, validation rows, label names, stats). Validation from data.validation_files or a seeded
    data.validation_ratio share. The label names cover both splits. Raises DsftError for bad data (see
    to_labelled) or when no training row is left."""
    stats = DataStats()
    train, validation = load_splits(data, lambda r: to_labelled(r, classify.text_field, classify.label_field), stats, seed)
    labels = label_names([r.label for r in [*train, *validation]])
    label2id = {label: i for i, label in enumerate(labels)}
    train_rows = encode_labelled(train, tokenizer, label2id, data, stats)
    validation_rows = encode_labelled(validation, tokenizer, label2id, data, stats)
    stats.train_examples, stats.validation_examples = len(train_rows), len(validation_rows)
    stats.train_tokens = sum(len(row["input_ids"]) for row in train_rows)
    if not train_rows:
        raise DsftError(f"no training examples left from data.train_files (records read: {stats.records_read}, "
                        f"skipped as bad: {stats.skipped_bad}, dropped as too long: {stats.dropped_too_long})")
    return train_rows, validation_rows, labels, stats
