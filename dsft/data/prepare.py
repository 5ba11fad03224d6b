"""`dsft data prepare`, top to bottom: read -> record steps -> split -> contamination -> train steps -> write -> report.

Records stream from the input files into an Arrow table on disk (memory-mapped by `datasets`),
record steps run over it in parallel where they are independent (clean, filters, PII, chunking)
and in one ordered pass where order matters (dedup keeps the first of each cluster). Only
indexes, hashes and labels are held in memory, so inputs may be larger than memory.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console

from dsft.data.balance import class_distribution, rebalance_indices
from dsft.data.columns import FieldMap
from dsft.data.dataset import DataStats, skip_or_raise
from dsft.data.dedup import DuplicateFinder
from dsft.data.fields import record_text
from dsft.data.fingerprint import Fingerprint, write_fingerprint
from dsft.data.formats import detect_format, to_example
from dsft.data.prepare_config import AugmentStep, BalanceStep, DedupStep, PrepareConfig
from dsft.data.prepare_report import write_prepare_report
from dsft.data.prepare_steps import RecordPipeline
from dsft.data.read import RawRecord, read_records
from dsft.data.split import find_contamination, split_indices
from dsft.errors import DsftError

SPLITS = ("train", "validation", "test")
DUPLICATE_EXAMPLES = 5
DUPLICATES_FILE = "duplicates.jsonl"


def run_prepare(config: PrepareConfig, console: Console | None = None) -> dict:
    """Prepare the configured inputs into output_dir; returns the report dict (also written as report.json)."""
    import datasets

    console = console or Console(soft_wrap=True)
    datasets.disable_progress_bars()  # the report gives the counts; per-map bars are noise
    started_s = time.perf_counter()
    out_dir = Path(config.output_dir)
    _refuse_overwriting_inputs(config, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DUPLICATES_FILE).write_text("", encoding="utf-8")  # dedup steps append to it
    tokenizer = _tokenizer(config)
    with tempfile.TemporaryDirectory(prefix="dsft-prepare-") as cache_dir:
        table, fmt, report = _read(config, cache_dir)
        console.print(f"read {report['records_in']:,} records ({fmt}), skipped {report['skipped_bad']:,} bad")
        table = _record_steps(table, config, fmt, tokenizer, report)
        splits = _split(table, config, fmt, report)
        splits["train"], augments = _train_steps(table, splits["train"], config, report)
        _write_outputs(table, splits, augments, config, fmt, tokenizer, out_dir, report)
    report["seconds"] = round(time.perf_counter() - started_s, 2)
    report["records_per_second"] = round(report["records_in"] / max(report["seconds"], 1e-9), 1)
    written = write_prepare_report(report, out_dir)
    console.print(f"wrote {', '.join(str(p) for p in written)}; {report['records_per_second']:,} records/s")
    return report


def _tokenizer(config: PrepareConfig):
    if config.tokenizer is None:
        return None
    from dsft.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(config.tokenizer)
    except (OSError, ValueError) as exc:
        raise DsftError(f"tokenizer: cannot load {config.tokenizer!r}: {str(exc).splitlines()[0]}") from None


def _read(config: PrepareConfig, cache_dir: str):
    """Validated raw records into an Arrow table (record as JSON text, source as file:line)."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    stats, counts, fmt_box = DataStats(), Counter(), {"format": None if config.format == "auto" else config.format}
    fields = FieldMap.of(config)

    def generate():
        for path in config.inputs:

            def unreadable(error: DsftError, path: str = path) -> None:
                counts[path] += 1
                stats.add_skip(error)

            for record in read_records(path, on_bad_record=unreadable if config.on_error == "skip" else None):
                counts[path] += 1
                renamed = _valid(record, fmt_box, fields, config, stats)
                if renamed is not None:
                    yield {"record": json.dumps(renamed.data, ensure_ascii=False), "source": renamed.source}

    # writer_batch_size bounds the records held in memory before they go to the Arrow file.
    try:
        table = Dataset.from_generator(generate, cache_dir=cache_dir, writer_batch_size=config.chunk_records)
    except DatasetGenerationError as exc:
        # datasets wraps what the generator raised; a bad record is the user's error, shown as such.
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, DsftError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None
    report = {"inputs": [{"path": p, "records": counts[p]} for p in config.inputs], "format": fmt_box["format"],
              "tokenizer": config.tokenizer, "records_in": sum(counts.values()),
              "skipped_bad": stats.skipped_bad, "skip_reasons": stats.skip_reasons, "steps": [], "train_steps": []}
    if fmt_box["format"] is None:
        raise DsftError(f"inputs: no records in {', '.join(config.inputs)}")
    return table, fmt_box["format"], report


def _valid(record: RawRecord, fmt_box: dict, fields: FieldMap, config: PrepareConfig, stats: DataStats) -> RawRecord | None:
    """record in dsft's field names when it is valid (the first one sets fmt_box's format); None: skipped."""
    try:
        record = fields.apply(record)
    except DsftError as error:
        return skip_or_raise(error, config.on_error == "skip", stats)
    if fmt_box["format"] is None:
        fmt_box["format"] = detect_format(record)  # a file of unknown layout is an error even with on_error skip
    try:
        to_example(record, fmt_box["format"])
    except DsftError as error:
        return skip_or_raise(fields.explain(error), config.on_error == "skip", stats)
    return record



def _record_steps(table, config: PrepareConfig, fmt: str, tokenizer, report: dict):
    """Run the record steps in order: runs of independent steps as one parallel map, dedup as an ordered pass."""
    segment: list = []
    for position, step in enumerate([*config.steps, None]):
        if step is not None and not isinstance(step, DedupStep):
            segment.append((position, step))
            continue
        if segment:
            table = RecordPipeline(segment, fmt, tokenizer).run(table, config.num_proc, config.chunk_records, report)
            segment = []
        if isinstance(step, DedupStep):
            table = _dedup(table, step, fmt, config.chunk_records, report, Path(config.output_dir))
    return table


def _dedup(table, step: DedupStep, fmt: str, batch_records: int, report: dict, out_dir: Path):
    """One ordered pass: each record is compared with the kept records before it. Every removal is
    listed in duplicates.jsonl (removed and kept record by file:line), a few in the report."""
    finder, kept, pairs = DuplicateFinder(step), [], []
    removed: Counter = Counter()
    index = 0
    for batch in table.iter(batch_size=batch_records):
        for text, source in zip(batch["record"], batch["source"]):
            hit = finder.add(index, record_text(json.loads(text), fmt))
            if hit is None:
                kept.append(index)
            else:
                removed[hit[1]] += 1
                pairs.append((source, hit[0], hit[1]))
            index += 1
    kept_sources = _sources(table, {kept_index for _, kept_index, _ in pairs}, batch_records)
    listed = [{"removed": source, "kept": kept_sources[kept_index], "kind": kind} for source, kept_index, kind in pairs]
    with open(out_dir / DUPLICATES_FILE, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in listed)
    report["steps"].append({"step": "dedup", "in": len(table), "out": len(kept), "removed": dict(removed)})
    report["duplicates"] = report.get("duplicates", []) + listed[:DUPLICATE_EXAMPLES]
    return table.select(kept)


def _sources(table, rows: set[int], batch_records: int) -> dict[int, str]:
    found, row = {}, 0
    for batch in table.select_columns(["source"]).iter(batch_size=batch_records):
        for source in batch["source"]:
            if row in rows:
                found[row] = source
            row += 1
    return found


def _iter_records(table, batch_records: int):
    """(row, record, source) in table order, one batch of JSON texts in memory at a time."""
    row = 0
    for batch in table.iter(batch_size=batch_records):
        for text, source in zip(batch["record"], batch["source"]):
            yield row, json.loads(text), source
            row += 1


def _field_values(table, field: str | None, batch_records: int) -> list | None:
    """A top-level field of every record as text (None where missing): labels, groups."""
    if field is None:
        return None
    values = [record.get(field) for _, record, _ in _iter_records(table, batch_records)]
    return [None if value is None else str(value) for value in values]


def _split(table, config: PrepareConfig, fmt: str, report: dict) -> dict[str, list[int]]:
    split, batch = config.split, config.chunk_records
    splits = split_indices(len(table), split.validation_ratio, split.test_ratio, split.seed,
                           labels=_field_values(table, split.stratify_field, batch),
                           groups=_field_values(table, split.group_field, batch))
    held_out = {row: name for name in ("validation", "test") for row in splits[name]}
    others: dict[str, dict[int, str]] = {"validation": {}, "test": {}}
    for row, record, _ in _iter_records(table, batch):
        if row in held_out:
            others[held_out[row]][row] = record_text(record, fmt)
    train_rows = set(splits["train"])
    train_texts = (record_text(record, fmt) for row, record, _ in _iter_records(table, batch) if row in train_rows)
    leaks = find_contamination(train_texts, {name: [others[name][row] for row in splits[name]] for name in others},
                               split.contamination_ngram)
    report["contamination"] = {
        "found": len(leaks), "dropped": len(leaks) if split.drop_contaminated else 0,
        # A leak's index is its position in the split it was found in.
        "examples": [{"split": leak.split, "source": table[splits[leak.split][leak.index]]["source"], "kind": leak.kind,
                      "overlap": round(leak.overlap, 3)} for leak in leaks[:DUPLICATE_EXAMPLES]],
    }
    if split.drop_contaminated:
        leaked = {(leak.split, leak.index) for leak in leaks}
        for name in ("validation", "test"):
            splits[name] = [index for position, index in enumerate(splits[name]) if (name, position) not in leaked]
    return splits


def _train_steps(table, train: list[int], config: PrepareConfig, report: dict) -> tuple[list[int], list[AugmentStep]]:
    """Balance the training rows (indexes, repeated when oversampled); augmentation happens while writing."""
    labels = _field_values(table, config.label_field, config.chunk_records)
    report["balance"] = None if labels is None else {"before": class_distribution([labels[i] for i in train])}
    rows, augments = list(train), []
    for step in config.train_steps:
        before = len(rows)
        if isinstance(step, BalanceStep):
            if labels is None:
                raise DsftError("train_steps: balance needs label_field, the field that holds each record's class")
            rows = [rows[i] for i in rebalance_indices([labels[row] for row in rows], step.max_ratio, step.method,
                                                       config.split.seed)]
            report["train_steps"].append({"step": "balance", "in": before, "out": len(rows),
                                          "removed": {"undersampled": max(before - len(rows), 0)}})
        elif isinstance(step, AugmentStep):
            augments.append(step)
            added = len(rows) * step.copies  # copies are made while writing, of the balanced rows
            report["train_steps"].append({"step": "augment", "in": before, "out": before + added, "added": added})
    if labels is not None:
        copies = 1 + sum(step.copies for step in augments)
        after = Counter()
        for row in rows:
            after[labels[row] if labels[row] is not None else "(none)"] += copies
        report["balance"]["after"] = dict(sorted(after.items()))
    return rows, augments


class _SplitWriter:
    """One output file with its fingerprint and record lengths."""

    def __init__(self, path: Path, fmt: str, tokenizer):
        self.path, self.fmt, self.tokenizer = path, fmt, tokenizer
        self.file = open(path, "w", encoding="utf-8")
        self.digest, self.lengths = Fingerprint(), []

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.digest.update(record)
        self.lengths.append(_length(record_text(record, self.fmt), self.tokenizer))

    def close(self) -> dict:
        self.file.close()
        write_fingerprint(self.path, self.digest.hexdigest(), self.digest.count)
        return {"path": str(self.path), "records": self.digest.count, "sha256": self.digest.hexdigest()}


def _refuse_overwriting_inputs(config, out_dir: Path) -> None:
    """Inputs are never modified: an output file that is one of them is a config error."""
    import glob

    outputs = {(out_dir / name).resolve() for name in [*(f"{split}.jsonl" for split in SPLITS), DUPLICATES_FILE]}
    for pattern in config.inputs:
        for path in glob.glob(pattern) or [pattern]:
            if Path(path).resolve() in outputs:
                raise DsftError(f"output_dir: {out_dir} would write over the input {path}; choose another output_dir")


def _write_outputs(table, splits: dict, augments: list, config: PrepareConfig, fmt: str, tokenizer, out_dir: Path,
                   report: dict) -> None:
    """One ordered pass over the table writes every split; augmented copies follow the training records."""
    times: dict[int, tuple[str, int]] = {}
    for name in SPLITS:
        for row, count in Counter(splits[name]).items():
            times[row] = (name, count)
    writers = {name: _SplitWriter(out_dir / f"{name}.jsonl", fmt, tokenizer) for name in SPLITS}
    augmenter = _Augmenter(augments, fmt, config.split.seed) if augments else None
    with tempfile.TemporaryFile("w+", encoding="utf-8") as augmented:
        for row, record, _ in _iter_records(table, config.chunk_records):
            name, count = times.get(row, (None, 0))
            for _ in range(count):
                writers[name].write(record)
                if name == "train" and augmenter is not None:
                    augmenter.write_copies(record, augmented)
        augmented.seek(0)
        for line in augmented:
            writers["train"].write(json.loads(line))
    report["outputs"] = {name: writer.close() for name, writer in writers.items()}
    report["splits"] = {name: output["records"] for name, output in report["outputs"].items()}
    report["token_lengths"] = {name: writer.lengths for name, writer in writers.items()}


class _Augmenter:
    def __init__(self, steps: list[AugmentStep], fmt: str, seed: int):
        from dsft.data.augment import load_function, load_synonyms

        self.fmt, self.rng = fmt, random.Random(seed)
        self.steps = [(step, load_synonyms(step.synonyms_file) if step.synonyms_file else {},
                       load_function(step.back_translation, "train_steps.augment.back_translation")
                       if step.back_translation else None) for step in steps]

    def write_copies(self, record: dict, out) -> None:
        from dsft.data.augment import augment_record

        for step, synonyms, back in self.steps:
            for _ in range(step.copies):
                copy = augment_record(record, self.fmt, step, self.rng, synonyms, back)
                out.write(json.dumps(copy, ensure_ascii=False) + "\n")


def _length(text: str, tokenizer) -> int:
    return len(text) if tokenizer is None else len(tokenizer(text, add_special_tokens=False)["input_ids"])

