"""Checkpoints that survive faults: staged, manifested, renamed into place, verified before use.

A checkpoint is written into `checkpoints/.staging/checkpoint-N`, a manifest (every file's size
and sha256) is written last, and only then is the directory renamed to `checkpoints/checkpoint-N`
(one rename on one file system, so a reader sees all of it or nothing). Resume takes the newest
checkpoint whose manifest verifies and says why it passed over any newer one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from dsft.errors import DsftError

MANIFEST = "manifest.json"
STAGING_DIR = ".staging"
_NAME = re.compile(r"checkpoint-(\d+)")
_CHUNK_BYTES = 1 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int) -> None:
    """Record every file of a staged checkpoint; the manifest itself lands last, atomically."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = []
    for path in files:
        _fsync(path)  # the data must be on disk before the manifest vouches for it
        entries.append({"path": path.relative_to(directory).as_posix(), "bytes": path.stat().st_size, "sha256": _sha256(path)})
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": entries}, indent=1), encoding="utf-8")
    _fsync(tmp)
    tmp.replace(directory / MANIFEST)


def _manifest_entries(directory: Path) -> list[dict]:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        raise ValueError("no manifest (the save did not finish)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable manifest ({exc})") from None


def _listed_file(directory: Path, entry: dict) -> Path:
    relative = Path(str(entry.get("path", "")))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"manifest lists a path outside the checkpoint: {entry.get('path')!r}")
    path = directory / relative
    if path.is_symlink() or not path.resolve().is_relative_to(directory.resolve()):
        raise ValueError(f"{relative}: a link out of the checkpoint")
    return path


def checkpoint_problem(directory: Path, hashes: bool = True) -> str | None:
    """Why a checkpoint must not be loaded, or None when its manifest verifies.

    hashes=False checks presence and sizes only (cheap, for rotation); True also the sha256.
    """
    try:
        for entry in _manifest_entries(directory):
            path = _listed_file(directory, entry)
            if not path.is_file():
                return f"{entry['path']}: missing"
            if path.stat().st_size != entry["bytes"]:
                return f"{entry['path']}: {path.stat().st_size} bytes, manifest says {entry['bytes']}"
            if hashes and _sha256(path) != entry["sha256"]:
                return f"{entry['path']}: sha256 differs from the manifest (corrupted)"
    except ValueError as exc:
        return str(exc)
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint-N directly under root, newest first; links are ignored."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def newest_good_checkpoint(root: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint whose manifest verifies; each newer, broken one is reported through warn."""
    for _, path in list_checkpoints(root):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warn(f"skipping {path}: {problem}")
    return None


def publish(staged: Path, root: Path, step: int) -> Path:
    """Manifest the staged checkpoint and rename it into root; returns its final path."""
    write_manifest(staged, step)
    target = root / staged.name
    if target.exists():
        # Saving a step again (after a resume): the old copy goes only once the new one is in place.
        retired = staged.parent / f"retired-{staged.name}"
        target.rename(retired)
        staged.rename(target)
        shutil.rmtree(retired)
    else:
        staged.rename(target)
    _fsync(root)
    return target


def rotate(root: Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest keep_last sound checkpoints (and protect, e.g. the best one).

    Only sound checkpoints count towards keep_last, so the only good checkpoint is never deleted;
    broken ones older than the newest sound one are deleted as garbage. Returns what was deleted.
    """
    checkpoints = list_checkpoints(root)
    sound = [path for _, path in checkpoints if checkpoint_problem(path, hashes=False) is None]
    kept = set(sound[:keep_last])
    if protect is not None:
        kept.add(protect)
    newest_sound_step = next((step for step, path in checkpoints if path in kept), None)
    deleted = []
    for step, path in checkpoints:
        if path in kept or (path not in sound and (newest_sound_step is None or step > newest_sound_step)):
            continue
        shutil.rmtree(path)
        deleted.append(path)
    return deleted


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def write_error(exc: OSError, root: Path, staged_bytes: int) -> DsftError:
    """A user-facing error for a failed checkpoint write, with the space it needs where that is the cause."""
    newest = list_checkpoints(root)
    needed_bytes = max(staged_bytes, directory_bytes(newest[0][1]) if newest else 0)
    kept = f"; the newest complete checkpoint {newest[0][1]} is untouched" if newest else ""
    if exc.errno in _DISK_FULL:
        free_bytes = shutil.disk_usage(root).free
        return DsftError(
            f"disk full writing a checkpoint under {root} ({exc.strerror}): it needs about "
            f"{needed_bytes / 2**20:,.1f} MiB and {free_bytes / 2**20:,.1f} MiB are free{kept}; "
            "free space or point output.dir elsewhere, then resume with --resume"
        )
    return DsftError(f"cannot write a checkpoint under {root}: {exc}{kept}")
