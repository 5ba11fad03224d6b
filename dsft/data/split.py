"""Train / validation / test split of `dsft data prepare`, and the contamination check between splits.

The split works on record indices only, so the caller can stream records to their files
afterwards. Groups (user, document, patient id) never straddle two splits; labels are
spread so each split keeps the label proportions as closely as rounding allows.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from dsft.data.dedup import normalize_for_dedup, text_digest

SPLITS = ("train", "validation", "test")

# Han (with extensions and compatibility ideographs) and kana are tokenized one character at a
# time, because these scripts put no spaces between words.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")


def _round_half_up(value: float) -> int:
    # Python's round() rounds 2.5 to 2 (banker's rounding); a split of 5 records at 50% should get 3.
    return math.floor(value + 0.5)


def _label_key(label: str | None) -> tuple[bool, str]:
    """Sort key putting None after every string label."""
    return (label is None, "" if label is None else label)


def _make_groups(count: int, groups: Sequence[str | None] | None) -> list[list[int]]:
    """Record indices per group, in order of first appearance; a None group is the record alone."""
    if groups is None:
        return [[index] for index in range(count)]
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        key = ("record", index) if group is None else ("group", group)
        members.setdefault(key, []).append(index)
    return list(members.values())


def _group_label(members: list[int], labels: Sequence[str | None]) -> str | None:
    """The most common label of a group; ties go to the label that sorts first."""
    counts = Counter(labels[index] for index in members)
    return min(counts, key=lambda label: (-counts[label], _label_key(label)))


def _strata(group_members: list[list[int]], labels: Sequence[str | None] | None) -> list[list[list[int]]]:
    """Groups split by (majority) label, strata in label order; one stratum without labels."""
    if labels is None:
        return [group_members]
    by_label: dict[str | None, list[list[int]]] = {}
    for members in group_members:
        by_label.setdefault(_group_label(members, labels), []).append(members)
    return [by_label[label] for label in sorted(by_label, key=_label_key)]


def _fill_stratum(
    stratum: list[list[int]], validation_ratio: float, test_ratio: float, rng: random.Random
) -> dict[str, list[int]]:
    """Assign the shuffled groups of one stratum, filling validation then test towards their targets.

    A group goes to a split when that brings the split at least as close to its target record
    count, and only while one record of the stratum is left for training.
    """
    rng.shuffle(stratum)
    size_records = sum(len(members) for members in stratum)
    targets = {
        "validation": _round_half_up(size_records * validation_ratio),
        "test": _round_half_up(size_records * test_ratio),
    }
    assigned: dict[str, list[int]] = {name: [] for name in SPLITS}
    held_out_records = 0
    for members in stratum:
        chosen = "train"
        for name in ("validation", "test"):
            have, add = len(assigned[name]), len(members)
            fits = held_out_records + add <= size_records - 1
            if have < targets[name] and fits and abs(have + add - targets[name]) <= targets[name] - have:
                chosen = name
                break
        assigned[chosen].extend(members)
        held_out_records += 0 if chosen == "train" else len(members)
    return assigned


def split_indices(
    count: int,
    validation_ratio: float,
    test_ratio: float,
    seed: int,
    labels: Sequence[str | None] | None = None,
    groups: Sequence[str | None] | None = None,
) -> dict[str, list[int]]:
    """Split record indices 0..count-1 into "train", "validation" and "test" (each sorted ascending).

    Records (or whole groups) are shuffled with random.Random(seed). Validation and test each get
    round-half-up(n * ratio) records, per label when `labels` is given (None is a label of its own),
    so each split keeps the label proportions as closely as rounding allows. Every non-empty
    stratum keeps at least one training record; validation is filled before test when that limit
    bites. With `groups`, a group (None: the record alone) lands in exactly one split; a group is
    stratified by its most common label, so stratification is exact only for single-label groups
    and otherwise best effort; split sizes approach their targets as closely as group sizes allow.
    Raises ValueError on ratios outside [0, 1), a sum of ratios >= 1, or label/group lists whose
    length is not `count`.
    """
    _check_split_args(count, validation_ratio, test_ratio, labels, groups)
    rng = random.Random(seed)
    result: dict[str, list[int]] = {name: [] for name in SPLITS}
    for stratum in _strata(_make_groups(count, groups), labels):
        for name, indices in _fill_stratum(stratum, validation_ratio, test_ratio, rng).items():
            result[name].extend(indices)
    return {name: sorted(indices) for name, indices in result.items()}


def _check_split_args(
    count: int, validation_ratio: float, test_ratio: float, labels: Sequence | None, groups: Sequence | None
) -> None:
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    for name, ratio in (("validation_ratio", validation_ratio), ("test_ratio", test_ratio)):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {ratio}")
    if validation_ratio + test_ratio >= 1.0:
        raise ValueError("validation_ratio + test_ratio must leave records for training (sum < 1)")
    for name, values in (("labels", labels), ("groups", groups)):
        if values is not None and len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries for {count} records")


@dataclass
class Leak:
    """A validation or test record that overlaps the training split."""

    index: int
    """Index of the record within its split's texts."""
    split: str
    """Name of the split the record is in ("validation", "test", ...)."""
    kind: str
    """"exact" (same normalized text as a training record) or "ngram" (shares an n-gram)."""
    train_index: int
    """Training record of the exact match, or the first training record holding the record's first shared n-gram."""
    overlap: float
    """Share of the record's n-gram positions found in train (1.0 for exact matches)."""


def overlap_tokens(text: str) -> list[str]:
    """Tokens of the contamination check: CJK characters one by one, other runs of word characters.

    The text is normalized like dedup (NFKC, case-folded), so full-width and upper-case forms match.
    """
    return _TOKEN.findall(normalize_for_dedup(text))


def _ngram_hashes(tokens: list[str], ngram: int) -> list[int]:
    # Hashes of token tuples instead of the tuples: a set of ints stays small for large corpora.
    # Python's str hash varies between processes but is stable within one, which is all we need.
    return [hash(tuple(tokens[start : start + ngram])) for start in range(len(tokens) - ngram + 1)]


def find_contamination(train_texts: Iterable[str], other_texts: dict[str, Sequence[str]], ngram: int) -> list[Leak]:
    """Records of `other_texts` (split name -> texts) that overlap `train_texts`.

    exact: the normalized text equals a training text. ngram: any `ngram`-token n-gram of the record
    (tokens from `overlap_tokens`) occurs in a training text; records with fewer than `ngram` tokens
    get the exact check only. Leaks come in split order, then index order.
    The small splits are indexed and the training texts read once, in order, so memory grows with
    validation and test, not with train. Raises ValueError when `ngram` < 1.
    """
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    records = [(split, index, text_digest(normalize_for_dedup(text)), _ngram_hashes(overlap_tokens(text), ngram))
               for split, texts in other_texts.items() for index, text in enumerate(texts)]
    exact_hits, ngram_hits = _scan_train(train_texts, records, ngram)
    leaks = []
    for record_id, (split, index, _, hashes) in enumerate(records):
        if record_id in exact_hits:
            leaks.append(Leak(index, split, "exact", exact_hits[record_id], 1.0))
            continue
        hits = [ngram_hits[(record_id, h)] for h in hashes if (record_id, h) in ngram_hits]
        if hits:
            leaks.append(Leak(index, split, "ngram", hits[0], len(hits) / len(hashes)))
    return leaks


def _scan_train(train_texts: Iterable[str], records: list, ngram: int) -> tuple[dict, dict]:
    """First train index matching each record exactly, and per (record, n-gram hash)."""
    by_digest: dict[bytes, list[int]] = {}
    by_ngram: dict[int, list[int]] = {}
    for record_id, (_, _, digest, hashes) in enumerate(records):
        by_digest.setdefault(digest, []).append(record_id)
        for ngram_hash in set(hashes):
            by_ngram.setdefault(ngram_hash, []).append(record_id)
    exact_hits: dict[int, int] = {}
    ngram_hits: dict[tuple[int, int], int] = {}
    for train_index, text in enumerate(train_texts):
        for record_id in by_digest.get(text_digest(normalize_for_dedup(text)), ()):
            exact_hits.setdefault(record_id, train_index)
        for ngram_hash in set(_ngram_hashes(overlap_tokens(text), ngram)):
            for record_id in by_ngram.get(ngram_hash, ()):
                ngram_hits.setdefault((record_id, ngram_hash), train_index)
    return exact_hits, ngram_hits
