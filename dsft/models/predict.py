"""Predictions of a head-task run on records: labels with their probabilities (classification), BIO tags and
entities per word (token_classification, predict_tokens.py), each head's (multitask, predict_multitask.py). Used by
dsft predict, dsft eval and the server alike, so each scores what the others return.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from dsft.data.labels import text_of
from dsft.data.read import RawRecord
from dsft.errors import DsftError

PREDICTORS = {
    "classification": "dsft.models.predict:predict_labels",
    "multitask": "dsft.models.predict_multitask:predict_heads",
    "token_classification": "dsft.models.predict_tokens:predict_tags",
}
"""task -> "module:function" called as f(model, tokenizer, config, records) -> the fields to add to each record."""


def predictor(task: str) -> Callable:
    """The prediction function of a head task (imported on first use: each pulls its own data helpers)."""
    module_name, function_name = PREDICTORS[task].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def predict_labels(model, tokenizer, config, records: Sequence[RawRecord]) -> list[dict]:
    """Sequence classification: {"prediction", "scores"} per record. A record that carries the label field
    must hold a label the run was trained on (DsftError naming the record otherwise)."""
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    texts = [text_of(record, config.classify.text_field) for record in records]
    for record in records:
        check_known_label(record, config.classify.label_field, labels)
    probabilities_BC = _probabilities(model, tokenizer, texts, config.data.max_length_tokens)
    predicted = []
    for row in probabilities_BC.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        predicted.append({"prediction": labels[best], "scores": dict(zip(labels, row))})
    return predicted


def check_known_label(record: RawRecord, label_field: str, labels: Sequence[str]) -> None:
    """A label present in a record to predict must be one the model knows, or scores against it mean nothing."""
    if label_field in record.data and record.data[label_field] is not None:
        label = str(record.data[label_field])
        if label not in labels:
            raise DsftError(f"{record.source}: field {label_field!r} is {label!r}, a label not seen in training; "
                            f"the run knows: {', '.join(labels)}")


def _probabilities(model, tokenizer, texts: Sequence[str], max_length_tokens: int):
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length_tokens,
                        padding=True, return_tensors="pt").to(model.device)
    logits_BC = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    return logits_BC.float().softmax(-1)
