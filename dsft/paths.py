"""Paths that must stay inside a directory: files of a run directory, checkpoints, exports.

A run directory may come from someone else; a name in it (or a symlink) must not make dsft read
or write outside of it.
"""

from __future__ import annotations

from pathlib import Path

from dsft.errors import DsftError


def resolve_inside(root: str | Path, relative: str | Path, what: str) -> Path:
    """The absolute, symlink-free path of root/relative; raises DsftError unless it lies inside root.

    `..` parts, an absolute path elsewhere and symlinks that point out of root are all refused;
    the path need not exist. The error names what the path is for, the path and the root.
    """
    root_resolved = Path(root).resolve()
    path = (root_resolved / relative).resolve()
    if not path.is_relative_to(root_resolved):
        raise DsftError(f"{what} {str(relative)!r} resolves to {path}, outside of {root_resolved}; refused")
    return path
