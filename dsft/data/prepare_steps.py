"""Record steps of `dsft data prepare` that look at one record at a time, run as one `datasets` map.

Each output row says where its record was dropped (the step's position, -1 when kept) and why,
so the report can count what every step removed without a pass per step. Chunking may turn one
record into several rows; the steps after it see each chunk.
"""

from __future__ import annotations

import json
from collections import Counter

from dsft.data import fields
from dsft.data.chunk import chunk_text
from dsft.data.clean import clean_text
from dsft.data.filters import classifier_reason, language_reason, length_reason, quality_reason
from dsft.data.pii import mask_record
from dsft.data.prepare_config import (
    ChunkStep,
    ClassifierFilterStep,
    CleanStep,
    LanguageFilterStep,
    LengthFilterStep,
    PiiStep,
    QualityFilterStep,
)
from dsft.userfunc import load_function

KEPT = -1


class RecordPipeline:
    """A run of consecutive record steps (position in config.steps, step) applied in order."""

    def __init__(self, segment: list[tuple[int, object]], fmt: str, tokenizer):
        self.segment = segment
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.scorers = {position: load_function(step.function, f"steps[{position}].function")
                        for position, step in segment if isinstance(step, ClassifierFilterStep)}

    def run(self, table, num_proc: int, batch_records: int, report: dict):
        """Map the table through the steps; appends one report entry per step; returns the kept rows."""
        mapped = table.map(self._batch, batched=True, batch_size=batch_records, num_proc=num_proc if num_proc > 1 else None,
                           remove_columns=table.column_names, desc=None)
        self._report(len(table), mapped, report)
        kept = mapped.filter(lambda dropped_at: dropped_at == KEPT, input_columns=["dropped_at"])
        return kept.select_columns(["record", "source"])

    def _batch(self, batch: dict) -> dict:
        out: dict = {"record": [], "source": [], "dropped_at": [], "reason": [], "masked": []}
        for text, source in zip(batch["record"], batch["source"]):
            for record, dropped_at, reason, masked in self._one(json.loads(text)):
                out["record"].append(json.dumps(record, ensure_ascii=False))
                out["source"].append(source)
                out["dropped_at"].append(dropped_at)
                out["reason"].append(reason)
                out["masked"].append(json.dumps(masked))
        return out

    def _one(self, record: dict):
        """(record, dropped_at, reason, masked counts) for each row this record becomes."""
        pending = [(record, Counter())]
        for position, step in self.segment:
            survivors = []
            for current, masked in pending:
                if isinstance(step, ChunkStep):
                    survivors += [(chunk, masked.copy()) for chunk in self._chunks(current, step)]
                    continue
                current, reason = self._apply(position, step, current, masked)
                if reason is None:
                    survivors.append((current, masked))
                else:
                    yield current, position, reason, dict(masked)
            pending = survivors
        for current, masked in pending:
            yield current, KEPT, "", dict(masked)

    def _apply(self, position: int, step, record: dict, masked: Counter) -> tuple[dict, str | None]:
        if isinstance(step, CleanStep):
            return fields.map_texts(record, self.fmt, lambda text: clean_text(text, step)), None
        if isinstance(step, PiiStep):
            return mask_record(record, self.fmt, step, masked), None
        text = fields.record_text(record, self.fmt)
        if isinstance(step, LengthFilterStep):
            return record, length_reason(self._count(text), step)
        if isinstance(step, LanguageFilterStep):
            return record, language_reason(text, step)
        if isinstance(step, QualityFilterStep):
            return record, quality_reason(text, fields.answer_text(record, self.fmt), step)
        if isinstance(step, ClassifierFilterStep):
            return record, classifier_reason(float(self.scorers[position](record)), step)
        raise ValueError(f"not a record step: {step!r}")

    def _count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _chunks(self, record: dict, step: ChunkStep) -> list[dict]:
        """Text records longer than max_tokens become one record per window (with "chunk": i)."""
        if self.fmt != "text":
            return [record]
        pieces = chunk_text(record["text"], self.tokenizer, step.max_tokens, step.stride_tokens)
        if len(pieces) == 1:
            return [record]
        return [{**record, "text": piece, "chunk": i} for i, piece in enumerate(pieces)]

    def _report(self, count_in: int, mapped, report: dict) -> None:
        # Whole columns at once: reading a datasets column value by value is far slower.
        columns = mapped.select_columns(["dropped_at", "reason", "masked"]).to_dict()
        dropped_at, reasons = columns["dropped_at"], columns["reason"]
        masked: Counter = Counter()
        for counts in columns["masked"]:
            masked.update(json.loads(counts))
        count = count_in
        for position, step in self.segment:
            removed = Counter(r for d, r in zip(dropped_at, reasons) if d == position)
            passed = sum(1 for d in dropped_at if d == KEPT or d > position)
            entry = {"step": step.step, "in": count, "out": passed, "removed": dict(removed)}
            if isinstance(step, PiiStep):
                entry["masked"] = dict(masked)
            report["steps"].append(entry)
            count = passed
