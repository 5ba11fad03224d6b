"""Fingerprints of prepared data files: a sha256 over canonical JSON lines, saved next to each file.

The digest covers the records, not the bytes of the file, so it is the same whatever key order or
spacing a writer used; a training run can record it and a rerun of prepare can be checked against it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

FINGERPRINT_SUFFIX = ".sha256"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def canonical_line(record: dict) -> str:
    """One record as compact JSON with sorted keys and unescaped non-ASCII text."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


class Fingerprint:
    """Streaming sha256 over canonical lines, each followed by "\\n"; count is the records seen."""

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self.count = 0

    def update(self, record: dict) -> None:
        """Add one record."""
        self._sha256.update((canonical_line(record) + "\n").encode("utf-8"))
        self.count += 1

    def hexdigest(self) -> str:
        """The digest so far (more records may still be added)."""
        return self._sha256.hexdigest()


def fingerprint_records(records: Iterable[dict]) -> str:
    """The hex digest of records, as Fingerprint computes it."""
    fingerprint = Fingerprint()
    for record in records:
        fingerprint.update(record)
    return fingerprint.hexdigest()


def fingerprint_path(data_file: Path) -> Path:
    """data_file with ".sha256" appended (train.jsonl -> train.jsonl.sha256)."""
    data_file = Path(data_file)
    return data_file.with_name(data_file.name + FINGERPRINT_SUFFIX)


def write_fingerprint(data_file: Path, digest: str, count: int) -> Path:
    """Write "<digest>  <name>" and a comment line saying what was hashed; return the .sha256 path."""
    path = fingerprint_path(data_file)
    path.write_text(
        f"{digest}  {Path(data_file).name}\n"
        f"# records: {count}, sha256 over canonical JSON lines (sorted keys, compact)\n",
        encoding="utf-8",
    )
    return path


def read_fingerprint(data_file: Path) -> str | None:
    """The digest saved next to data_file; None when there is no .sha256 file or it holds no digest."""
    path = fingerprint_path(data_file)
    if not path.is_file():
        return None
    first_line = path.read_text(encoding="utf-8").partition("\n")[0]
    digest = first_line.split(" ", 1)[0].strip().lower()
    return digest if SHA256_PATTERN.match(digest) else None
