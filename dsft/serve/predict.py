"""Label a file of records with a classifier run (any head task): one output line per input record.

Each line is the input record plus the task's predictions; for task classification "prediction"
(the label with the highest probability) and "scores" ({label: probability}); for token_classification
"tags" (one per word) and "entities" (dsft.serve.predict_tokens). Texts are tokenized
as in training (the tokenizer's special tokens, truncated to data.max_length_tokens). The input
file is only read; the output is written aside and renamed into place.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from dsft.data.labels import text_of
from dsft.data.read import RawRecord, read_records
from dsft.errors import DsftError


def predict_file(run_dir: str | Path, input_path: str | Path, output_path: str | Path) -> int:
    """Write the predictions of the run's classifier for every record of input_path; returns the count.

    Raises DsftError when the run is not a classification run, the output would replace the input,
    or a record lacks the text field (naming file:line).
    """
    import torch

    from dsft.models.load import load_run

    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.exists() and input_path.exists() and output_path.resolve() == input_path.resolve():
        raise DsftError(f"--output {output_path} is the input file; predictions are never written over the input")
    model, tokenizer, config = load_run(run_dir)
    if config.task not in PREDICTORS:
        raise DsftError(f"{run_dir}: a {config.task} run; dsft predict needs a run trained with task: "
                        f"{' | '.join(PREDICTORS)}")
    module_name, function_name = PREDICTORS[config.task].split(":")
    predict_batch = getattr(importlib.import_module(module_name), function_name)
    count = 0
    partial = output_path.with_name(output_path.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as out, torch.no_grad():
            for batch in _batches(read_records(input_path), config.eval.batch_size):
                for record, predicted in zip(batch, predict_batch(model, tokenizer, config, batch)):
                    out.write(json.dumps({**record.data, **predicted}, ensure_ascii=False) + "\n")
                    count += 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output_path)  # a failed run leaves no half-written output under the real name
    return count


PREDICTORS = {
    "classification": "dsft.serve.predict:predict_labels",
    "multitask": "dsft.serve.predict_multitask:predict_heads",
    "token_classification": "dsft.serve.predict_tokens:predict_tags",
}
"""task -> "module:function" called as f(model, tokenizer, config, records) -> the fields to add to each record."""


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


def _batches(records: Iterator[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    batch: list[RawRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
