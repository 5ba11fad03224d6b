"""Label a file of records with a classifier run (any head task): one output line per input record.

Each line is the input record plus the task's predictions; for task classification "prediction"
(the label with the highest probability) and "scores" ({label: probability}); for token_classification
"tags" (one per word) and "entities" (dsft.models.predict_tokens). Texts are tokenized
as in training (the tokenizer's special tokens, truncated to data.max_length_tokens). The input
file is only read; the output is written aside and renamed into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from dsft.data.read import RawRecord, read_records
from dsft.errors import DsftError
from dsft.models.predict import PREDICTORS, predictor


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
    predict_batch = predictor(config.task)
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


def _batches(records: Iterator[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    batch: list[RawRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
