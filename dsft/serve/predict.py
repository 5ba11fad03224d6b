"""Label a file of records with a classification run: one output line per input record.

Each line is the input record plus "prediction" (the label with the highest probability) and
"scores" ({label: probability}). Texts are tokenized as in training (the tokenizer's special
tokens, truncated to data.max_length_tokens). The input file is only read.
"""

from __future__ import annotations

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
    if config.task != "classification":
        raise DsftError(f"{run_dir}: a {config.task} run; dsft predict needs a run trained with task: classification")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    count = 0
    partial = output_path.with_name(output_path.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as out:
            for batch in _batches(read_records(input_path), config.eval.batch_size):
                texts = [text_of(record, config.classify.text_field) for record in batch]
                with torch.no_grad():
                    probabilities_BC = _probabilities(model, tokenizer, texts, config.data.max_length_tokens)
                for record, row in zip(batch, probabilities_BC.tolist()):
                    best = max(range(len(row)), key=row.__getitem__)
                    line = {**record.data, "prediction": labels[best], "scores": dict(zip(labels, row))}
                    out.write(json.dumps(line, ensure_ascii=False) + "\n")
                    count += 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output_path)  # a failed run leaves no half-written output under the real name
    return count


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
