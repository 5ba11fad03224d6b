"""`dsft data inspect FILE`: counts, the format found, length statistics and a few sample records."""

from __future__ import annotations

import json
import statistics
from collections import Counter

from rich.console import Console
from rich.table import Table

from dsft.data.dataset import DataStats, load_examples
from dsft.data.fields import record_text
from dsft.data.formats import detect_format
from dsft.data.read import read_records


def _percentile(sorted_values: list[int], share: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


def length_stats(lengths: list[int]) -> dict:
    """min / mean / p50 / p95 / max of lengths (empty: all zero)."""
    if not lengths:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(lengths)
    return {"min": ordered[0], "mean": round(statistics.fmean(ordered), 1), "p50": _percentile(ordered, 0.5),
            "p95": _percentile(ordered, 0.95), "max": ordered[-1]}


def inspect_file(path: str, tokenizer_path: str | None = None, samples: int = 3, console: Console | None = None) -> dict:
    """Summarize a data file; bad records are counted (with their file:line), not fatal."""
    console = console or Console(soft_wrap=True)
    tokenizer = None
    if tokenizer_path:
        from dsft.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)
    first = next(iter(read_records(path)), None)
    fmt = detect_format(first) if first is not None else None
    stats = DataStats()
    valid = len(load_examples([path], fmt, "skip", stats, require_answer=False)) if fmt else 0
    records = [r.data for r in read_records(path, on_bad_record=lambda error: None)]
    texts = [record_text(record, fmt) for record in records] if fmt else []
    unit = "tokens" if tokenizer else "characters"
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) if tokenizer else len(t) for t in texts]
    summary = {"path": path, "format": fmt, "records": stats.records_read, "valid": valid, "bad": stats.skipped_bad,
               "bad_examples": stats.skip_reasons[:5], "length_unit": unit, "lengths": length_stats(lengths),
               "keys": dict(Counter(key for record in records for key in record))}
    _print(summary, records[:samples], console)
    return summary


def _print(summary: dict, samples: list[dict], console: Console) -> None:
    table = Table(title=f"{summary['path']} ({summary['format']})")
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("records", "valid", "bad"):
        table.add_row(key, f"{summary[key]:,}")
    for key, value in summary["lengths"].items():
        table.add_row(f"length {key} ({summary['length_unit']})", str(value))
    console.print(table)
    for reason in summary["bad_examples"]:
        console.print(f"bad: {reason}", markup=False)
    for record in samples:
        console.print(json.dumps(record, ensure_ascii=False)[:500], markup=False, highlight=False)


