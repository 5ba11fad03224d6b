"""Padding-free packing: samples grouped best-fit-decreasing into rows of a token budget.

A packed row is the samples' tokens back to back with position ids restarting at each sample.
transformers turns restarting position ids into attention confined to each sample (a
block-diagonal causal mask for eager/sdpa, varlen kernels for flash attention), and the first
label of every sample is masked, so no loss crosses a sample boundary: a packed row gives the
loss and gradients of the same samples padded (tests/unit/test_packing.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indexes of lengths grouped into bins of at most capacity tokens, longest first, each into the
    fullest bin it fits (best fit). Rows come out in order of creation; each lists its samples in
    the order they were placed. Raises ValueError for a sample longer than capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin number), sorted: the best fit is the first that fits
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sample {index} has {length} tokens, more than the row budget {capacity}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - length, len(bins) - 1))
            continue
        room, number = free.pop(slot)
        bins[number].append(index)
        bisect.insort(free, (room - length, number))
    return bins


def packed_rows(rows: Sequence[dict], capacity: int) -> list[list[dict]]:
    """Training rows ({"input_ids", "labels", ...}) grouped into packs of at most capacity tokens."""
    groups = pack_best_fit_decreasing([len(row["input_ids"]) for row in rows], capacity)
    return [[rows[i] for i in group] for group in groups]


class PackedCollator:
    """Collates a batch of packs into padding-free rows (one row per pack) with restarting position ids.

    Built on transformers' DataCollatorWithFlattening, which masks each sample's first label; dsft adds
    the sample ids of the ledger and padding between packs when a batch holds more than one.
    """

    def __init__(self, pad_token_id: int):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
        self.pad_token_id = pad_token_id

    def __call__(self, packs: list[list[dict]]) -> dict:
        import torch

        rows = [self.flatten([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in pack]) for pack in packs]
        width = max(row["input_ids"].shape[1] for row in rows)
        batch = {
            "input_ids": _stack([row["input_ids"][0] for row in rows], width, self.pad_token_id),
            "labels": _stack([row["labels"][0] for row in rows], width, -100),
            # Padding continues a row's positions from 0, so it forms its own sequence and sees no sample.
            "position_ids": _stack([row["position_ids"][0] for row in rows], width, None),
            # transformers confines attention to each sample only without a KV cache (a training forward).
            "use_cache": False,
        }
        if "sample_id" in packs[0][0]:
            batch["sample_id"] = torch.tensor([s["sample_id"] for pack in packs for s in pack])
        return batch


def _stack(tensors: list, width: int, fill: int | None):
    import torch

    out = []
    for tensor in tensors:
        pad = width - tensor.shape[0]
        tail = torch.arange(pad) if fill is None else torch.full((pad,), fill, dtype=tensor.dtype)
        out.append(torch.cat([tensor, tail.to(tensor.dtype)]))
    return torch.stack(out)
