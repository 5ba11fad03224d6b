"""Read raw records from data files: jsonl, json, csv, parquet or a `datasets` save_to_disk directory.

Every record carries its source ("path:LINE" or "path:row N") so that later validation errors
point at the exact place to fix. Input files are only ever opened for reading.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dsft.errors import DsftError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")

_WHITESPACE = " \t\r\n"


@dataclass(frozen=True)
class RawRecord:
    """One parsed record and where it came from."""

    data: dict
    """The record's fields as parsed (JSON object, CSV row, parquet or dataset row)."""
    source: str
    """Where it came from, for error messages: "path:LINE" (1-based line where the record starts)
    for jsonl, json and csv; "path:row N" (1-based) for parquet and datasets directories."""


def read_records(
    path: str | Path, on_bad_record: Callable[[DsftError], None] | None = None
) -> Iterator[RawRecord]:
    """Yield the records of one data file or `datasets` directory, in file order.

    A bad record (a jsonl line that is not valid JSON, a record that is not an object, a csv row
    with the wrong number of cells) raises DsftError naming "path:LINE", unless on_bad_record is
    given: then the error is passed to it and reading goes on with the next record.
    Raises DsftError, never passed to on_bad_record, when the path does not exist, its extension is
    not supported, or the file as a whole cannot be read (a .json file that does not parse, a
    corrupt parquet file, a directory that is not a saved dataset).
    """
    path = Path(path)
    report = on_bad_record if on_bad_record is not None else _raise
    if not path.exists():
        raise DsftError(f"data file not found: {path}")
    if path.is_dir():
        return _read_dataset_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, report)
    if suffix == ".json":
        return _read_json(path, report)
    if suffix == ".csv":
        return _read_csv(path, report)
    if suffix == ".parquet":
        return _read_parquet(path)
    extension = repr(path.suffix) if path.suffix else "(none)"
    raise DsftError(
        f"{path}: unsupported data file extension {extension}; allowed: {', '.join(EXTENSIONS)}, "
        "or a directory saved with datasets' save_to_disk"
    )


def _raise(error: DsftError) -> None:
    raise error


def json_type(value: object) -> str:
    """Name of a parsed value's type for error messages: object, list, string, number, boolean, null."""
    if value is None:
        return "null"
    names = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


def _as_record(value: object, source: str, report: Callable[[DsftError], None]) -> RawRecord | None:
    if isinstance(value, dict):
        return RawRecord(value, source)
    report(DsftError(f"{source}: expected a JSON object, got {json_type(value)}"))
    return None


def _read_jsonl(path: Path, report: Callable[[DsftError], None]) -> Iterator[RawRecord]:
    with _open_text(path) as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            source = f"{path}:{line_number}"
            try:
                # Without the line break, a line cut short is reported at its own last column.
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                report(DsftError(f"{source}: not valid JSON: {exc.msg} (column {exc.colno})"))
                continue
            record = _as_record(value, source, report)
            if record is not None:
                yield record


def _read_json(path: Path, report: Callable[[DsftError], None]) -> Iterator[RawRecord]:
    with _open_text(path) as file:
        text = file.read()
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, 0)
    if not text.startswith("[", position):
        found = json_type(_decode_at(decoder, text, position, path)[0])
        raise DsftError(
            f"{path}: a .json data file must hold a top-level array of records, got {found}; "
            "for one record per line use .jsonl"
        )
    # Walking the array element by element (instead of json.load) gives each record the line
    # where it starts, so validation errors name a line the user can jump to.
    position = _skip_whitespace(text, position + 1)
    more = not text.startswith("]", position)
    line_number, counted_to = 1, 0
    while more:
        value, end = _decode_at(decoder, text, position, path)
        line_number += text.count("\n", counted_to, position)
        counted_to = position
        record = _as_record(value, f"{path}:{line_number}", report)
        if record is not None:
            yield record
        position, more = _after_element(text, end, path)
    trailing = _skip_whitespace(text, position + 1)
    if trailing < len(text):
        raise _json_syntax_error(path, text, trailing, "Extra data after the top-level array")


def _decode_at(decoder: json.JSONDecoder, text: str, position: int, path: Path) -> tuple[object, int]:
    try:
        return decoder.raw_decode(text, position)
    except json.JSONDecodeError as exc:
        raise DsftError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None


def _after_element(text: str, end: int, path: Path) -> tuple[int, bool]:
    """After an array element: (position of the next element, True) or (position of the closing ']', False)."""
    position = _skip_whitespace(text, end)
    if text.startswith(",", position):
        return _skip_whitespace(text, position + 1), True
    if text.startswith("]", position):
        return position, False
    raise _json_syntax_error(path, text, position, "Expecting ',' delimiter")


def _json_syntax_error(path: Path, text: str, position: int, message: str) -> DsftError:
    error = json.JSONDecodeError(message, text, position)
    return DsftError(f"{path}:{error.lineno}: not valid JSON: {message} (column {error.colno})")


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


def _read_csv(path: Path, report: Callable[[DsftError], None]) -> Iterator[RawRecord]:
    # csv.reader instead of DictReader: DictReader skips blank lines internally, which would make
    # the start line of the following record unknowable (a quoted cell may span several lines).
    with _open_text(path, newline="") as file:
        reader = csv.reader(file)
        header: list[str] | None = None
        last_line = 0
        for row in reader:
            start_line, last_line = last_line + 1, reader.line_num
            if not row:
                continue
            if header is None:
                header = _csv_header(row, path, start_line)
                continue
            source = f"{path}:{start_line}"
            if len(row) != len(header):
                report(DsftError(f"{source}: expected {len(header)} cells ({', '.join(header)}), got {len(row)}"))
                continue
            yield RawRecord(dict(zip(header, row)), source)


def _csv_header(row: list[str], path: Path, line_number: int) -> list[str]:
    duplicates = sorted({name for name in row if row.count(name) > 1})
    if duplicates:
        raise DsftError(f"{path}:{line_number}: duplicate column names in the csv header: {', '.join(duplicates)}")
    return row


@contextmanager
def _open_text(path: Path, newline: str | None = None) -> Iterator[TextIO]:
    """Open path as UTF-8 text; a decoding error anywhere in the with block becomes DsftError."""
    try:
        # utf-8-sig: a byte-order mark left by some editors would otherwise break the first record.
        with open(path, encoding="utf-8-sig", newline=newline) as file:
            yield file
    except UnicodeDecodeError as exc:
        raise DsftError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet_file = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DsftError(f"{path}: not a readable parquet file: {exc}") from None
    row_number = 0
    with parquet_file:
        for batch in parquet_file.iter_batches():
            for row in batch.to_pylist():
                row_number += 1
                yield RawRecord(row, f"{path}:row {row_number}")


def _read_dataset_dir(path: Path) -> Iterator[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DsftError(f"{path}: a directory, but not a dataset saved with datasets' save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _single_split(loaded, path)
    for row_number, row in enumerate(loaded, start=1):
        yield RawRecord(row, f"{path}:row {row_number}")


def _single_split(dataset_dict, path: Path):
    splits = list(dataset_dict)
    if len(splits) != 1:
        raise DsftError(
            f"{path}: a DatasetDict with splits {', '.join(splits)}; name one split's directory "
            f"instead, e.g. {path / splits[0]}"
        )
    return dataset_dict[splits[0]]
