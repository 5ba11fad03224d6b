"""Find exact and near duplicates in a stream of record texts (the `dedup` step of `dsft data prepare`).

Records arrive one at a time in input order; the first record of each cluster is kept and every
later member is reported as a duplicate of it. Only hashes and the MinHash LSH index are held,
never the texts, so memory grows by a few hundred bytes per kept record whatever the text length.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

import xxhash
from datasketch import MinHash, MinHashLSH

from dsft.data.prepare_config import DedupStep

# A fixed seed and scheme make the MinHash permutations, and so which records are found as
# near duplicates, identical across runs and machines.
_MINHASH_SEED = 1
_MINHASH_SCHEME = "affine32"
# xxh32 instead of datasketch's default sha1 per shingle: about 15x faster, and MinHash needs only
# a well-mixed 32-bit hash, not a cryptographic one (xxhash comes with `datasets`).
_SHINGLE_HASH = xxhash.xxh32_intdigest
_WHITESPACE_RUN = re.compile(r"\s+")


def normalize_for_dedup(text: str) -> str:
    """NFKC, case-folded, runs of whitespace collapsed to one space, stripped."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _WHITESPACE_RUN.sub(" ", folded).strip()


def text_digest(normalized_text: str) -> bytes:
    """sha256 of an already normalized text: the key of the exact duplicate check."""
    return hashlib.sha256(normalized_text.encode("utf-8")).digest()


def char_shingles(normalized_text: str, shingle_chars: int) -> set[str]:
    """Distinct character shingles of length `shingle_chars`; a shorter text is one shingle."""
    if len(normalized_text) <= shingle_chars:
        return {normalized_text}
    last_start = len(normalized_text) - shingle_chars
    return {normalized_text[start : start + shingle_chars] for start in range(last_start + 1)}


@dataclass
class Duplicates:
    """Which records a dedup pass removed and why."""

    duplicate_of: dict[int, int] = field(default_factory=dict)
    """Removed record index -> index of the kept record it duplicates (the first of its cluster)."""
    kind: dict[int, str] = field(default_factory=dict)
    """Removed record index -> "exact" or "near"."""


class DuplicateFinder:
    """Streaming duplicate finder configured by a `DedupStep`.

    Call `add` with strictly increasing record indices (input order), then `result`. With
    `exact` and `near` both off every record is kept.
    """

    def __init__(self, step: DedupStep):
        self._step = step
        self._first_index_by_digest: dict[bytes, int] = {}
        self._lsh = MinHashLSH(threshold=step.threshold, num_perm=step.num_perm) if step.near else None
        # Permutations are drawn once: building them per record would dominate the cost.
        self._permutations = MinHash(num_perm=step.num_perm, seed=_MINHASH_SEED, scheme=_MINHASH_SCHEME).permutations
        self._last_index = -1
        self._duplicates = Duplicates()

    def add(self, index: int, text: str) -> tuple[int, str] | None:
        """Check record `index` against the kept records before it.

        Returns (kept_index, "exact" | "near") when it duplicates an earlier kept record (it is then
        not indexed), else None and the record is kept and indexed. A near match against several
        kept records names the smallest index, so results do not depend on LSH bucket order.
        Raises ValueError when `index` is not larger than the previous one.
        """
        if index <= self._last_index:
            raise ValueError(f"record indices must increase: got {index} after {self._last_index}")
        self._last_index = index
        normalized = normalize_for_dedup(text)
        digest = text_digest(normalized)
        match = self._exact_match(digest)
        minhash = None
        if match is None and self._lsh is not None:
            minhash = self._minhash(normalized)
            match = self._near_match(minhash)
        if match is not None:
            self._duplicates.duplicate_of[index] = match[0]
            self._duplicates.kind[index] = match[1]
            return match
        self._keep(index, digest, minhash)
        return None

    def result(self) -> Duplicates:
        """The duplicates found so far."""
        return self._duplicates

    def _exact_match(self, digest: bytes) -> tuple[int, str] | None:
        if self._step.exact and digest in self._first_index_by_digest:
            return self._first_index_by_digest[digest], "exact"
        return None

    def _near_match(self, minhash: MinHash) -> tuple[int, str] | None:
        # An LSH candidate counts as a match without a Jaccard re-check: the re-check would need
        # every kept sketch in memory, and MinHashLSH already tunes its bands to the threshold.
        candidates = self._lsh.query(minhash)
        return (min(candidates), "near") if candidates else None

    def _keep(self, index: int, digest: bytes, minhash: MinHash | None) -> None:
        if self._step.exact:
            self._first_index_by_digest[digest] = index
        if minhash is not None:
            # Only kept records are indexed, so a duplicate always points at a kept record.
            self._lsh.insert(index, minhash, check_duplication=False)

    def _minhash(self, normalized: str) -> MinHash:
        minhash = MinHash(
            num_perm=self._step.num_perm,
            seed=_MINHASH_SEED,
            hashfunc=_SHINGLE_HASH,
            permutations=self._permutations,
            scheme=_MINHASH_SCHEME,
        )
        shingles = char_shingles(normalized, self._step.shingle_chars)
        minhash.update_batch([shingle.encode("utf-8") for shingle in shingles])
        return minhash
