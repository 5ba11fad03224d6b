"""Class counts and rebalancing of the training split (the `balance` train step of `dsft data prepare`).

Rebalancing returns record indices, not records: the caller writes records in that order, so
an oversampled record appears once per repeat.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

NONE_LABEL = "(none)"
"""How a missing label is shown in class distributions."""

# Float slack for caps such as 2 * 3.0 or 10 / 2.5, so a product meant to be whole is not
# floored or ceiled one record off.
_SLACK = 1e-9


def class_distribution(labels: Sequence[str | None]) -> dict[str, int]:
    """Record count per label, sorted by label; None is counted as "(none)"."""
    counts = Counter(NONE_LABEL if label is None else label for label in labels)
    return {label: counts[label] for label in sorted(counts)}


def _indices_by_label(labels: Sequence[str | None]) -> dict[str | None, list[int]]:
    """Record indices per label (ascending), labels in sorted order so seeded draws are reproducible."""
    by_label: dict[str | None, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    # None sorts last and stays apart from a real label spelled "(none)".
    return {label: by_label[label] for label in sorted(by_label, key=lambda label: (label is None, label or ""))}


def _undersample(by_label: dict[str | None, list[int]], max_ratio: float, rng: random.Random) -> list[int]:
    """Cap every class at floor(min_count * max_ratio) records, drawn at random."""
    cap = math.floor(min(len(indices) for indices in by_label.values()) * max_ratio + _SLACK)
    kept: list[int] = []
    for indices in by_label.values():
        kept.extend(rng.sample(indices, cap) if len(indices) > cap else indices)
    return sorted(kept)


def _oversample(by_label: dict[str | None, list[int]], max_ratio: float, rng: random.Random) -> list[int]:
    """Raise every class to ceil(max_count / max_ratio) records by repeating its records."""
    floor_count = math.ceil(max(len(indices) for indices in by_label.values()) / max_ratio - _SLACK)
    out: list[int] = []
    for indices in by_label.values():
        out.extend(indices)
        missing = floor_count - len(indices)
        if missing > 0:
            # Cycling through one shuffle repeats every record once before any record twice.
            order = rng.sample(indices, len(indices))
            out.extend(order[repeat % len(order)] for repeat in range(missing))
    # Sorting puts each repeat right after its original, in the records' first-occurrence order.
    return sorted(out)


def rebalance_indices(labels: Sequence[str], max_ratio: float, method: str, seed: int) -> list[int]:
    """Indices of the training records to write so that max/min class count <= max_ratio.

    undersample: every class is capped at floor(min_count * max_ratio) records, chosen with
    random.Random(seed); the output keeps the original order. oversample: every class is raised
    to at least ceil(max_count / max_ratio) records by cycling through a seeded shuffle of its
    records; the output is sorted, so repeats follow their original. A None label is a class of
    its own. Raises ValueError on max_ratio < 1 or an unknown method.
    """
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    if method not in ("undersample", "oversample"):
        raise ValueError(f"method must be 'undersample' or 'oversample', got {method!r}")
    if not labels:
        return []
    by_label = _indices_by_label(labels)
    rng = random.Random(seed)
    if method == "undersample":
        return _undersample(by_label, max_ratio, rng)
    return _oversample(by_label, max_ratio, rng)
