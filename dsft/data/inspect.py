"""`dsft data inspect FILE`: counts, the format and layout found (and what dsft does with it), length statistics
and a few sample records."""

from __future__ import annotations

import json
import statistics
from collections import Counter

from rich.console import Console
from rich.table import Table

from dsft.data.columns import FieldMap
from dsft.data.dataset import DataStats, load_validated
from dsft.data.fields import record_text
from dsft.data.formats import MEDIA_FIELDS, detect_format
from dsft.data.read import RawRecord, read_records
from dsft.errors import DsftError


def _percentile(sorted_values: list[int], share: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


def length_stats(lengths: list[int]) -> dict:
    """min / mean / p50 / p95 / max of lengths (empty: all zero)."""
    if not lengths:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(lengths)
    return {"min": ordered[0], "mean": round(statistics.fmean(ordered), 1), "p50": _percentile(ordered, 0.5),
            "p95": _percentile(ordered, 0.95), "max": ordered[-1]}


LAYOUTS = {
    "images": "refused: dsft trains text models only (records with images, audio or video)",
    "preference pairs": "stage dpo or reward (a prompt, a chosen and a rejected answer)",
    "unpaired preference": "stage kto (each answer labelled desirable or not)",
    "tool calling": "stage sft: the calls and answers train, the tool results never; dsft serve answers tools",
    "text": "continued pre-training: every token trains",
    "sft": "stage sft (or a head task): the assistant answers train",
}
"""The layouts inspect names, and what dsft does with each."""


def layout_of(record: dict, fmt: str | None) -> str:
    """The layout of a record (a key of LAYOUTS)."""
    turns = record.get("messages") or record.get("conversations") or []
    turns = turns if isinstance(turns, list) else []
    if any(record.get(key) not in (None, [], "") for key in MEDIA_FIELDS):
        return "images"
    if "chosen" in record and "rejected" in record:
        return "preference pairs"
    if isinstance(record.get("label"), bool):
        return "unpaired preference"
    roles = {turn.get("role") or turn.get("from") for turn in turns if isinstance(turn, dict)}
    if record.get("tools") or any(isinstance(t, dict) and t.get("tool_calls") for t in turns) or \
            roles & {"tool", "function_call", "observation"}:
        return "tool calling"
    return "text" if fmt == "text" else "sft"


def _validator(layout: str, fmt: str | None):
    from dsft.data.formats import to_example
    from dsft.data.kto_data import to_labelled
    from dsft.data.preference import to_pair

    if layout == "preference pairs":
        return to_pair
    if layout == "unpaired preference":
        return to_labelled
    return lambda record: to_example(record, fmt, require_answer=False)


def inspect_file(path: str, tokenizer_path: str | None = None, samples: int = 3, console: Console | None = None,
                 fields: FieldMap | None = None) -> dict:
    """Summarize a data file; bad records are counted (with their file:line), not fatal. fields renames each record
    first (a run config's data.columns and data.tags)."""
    console, fields = console or Console(soft_wrap=True), fields or FieldMap()
    tokenizer = None
    if tokenizer_path:
        from dsft.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)
    first = next(iter(read_records(path)), None)
    first = fields.apply(first) if first is not None else None
    layout = layout_of(first.data, None) if first is not None else None
    fmt = detect_format(first) if first is not None and layout not in ("preference pairs", "unpaired preference",
                                                                          "images") else None
    layout = layout_of(first.data, fmt) if first is not None else None
    stats = DataStats()
    valid = len(load_validated([path], _validator(layout, fmt), "skip", stats, fields=fields)) \
        if layout not in (None, "images") else 0
    records = [_renamed_or_raw(r, fields) for r in read_records(path, on_bad_record=lambda error: None)]
    texts = [record_text(record, fmt) if fmt else json.dumps(record, ensure_ascii=False) for record in records]
    unit = "tokens" if tokenizer else "characters"
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) if tokenizer else len(t) for t in texts]
    summary = {"path": path, "format": fmt, "layout": layout, "dsft_does": LAYOUTS.get(layout), "records": stats.records_read, "valid": valid, "bad": stats.skipped_bad,
               "bad_examples": stats.skip_reasons[:5], "length_unit": unit, "lengths": length_stats(lengths),
               "keys": dict(Counter(key for record in records for key in record))}
    _print(summary, records[:samples], console)
    return summary


def _renamed_or_raw(record: RawRecord, fields: FieldMap) -> dict:
    try:
        return fields.apply(record).data
    except DsftError:
        return record.data  # counted as bad by load_validated; its length is still the file's


def _print(summary: dict, samples: list[dict], console: Console) -> None:
    table = Table(title=f"{summary['path']} ({summary['format']})")
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("records", "valid", "bad"):
        table.add_row(key, f"{summary[key]:,}")
    for key, value in summary["lengths"].items():
        table.add_row(f"length {key} ({summary['length_unit']})", str(value))
    console.print(table)
    if summary["layout"] is not None:
        console.print(f"layout: {summary['layout']}: {summary['dsft_does']}", markup=False)
    for reason in summary["bad_examples"]:
        console.print(f"bad: {reason}", markup=False)
    for record in samples:
        console.print(json.dumps(record, ensure_ascii=False)[:500], markup=False, highlight=False)


