"""Packing: exact best-fit-decreasing groups, and packed loss and gradients equal to padded ones.

Tolerances: both sides run in this process, on whatever CPU path it has, through sums of different shapes (one row of
many sequences against padded rows), so they are equal up to rounding, not bitwise; one forward and backward, no
optimizer step, so the gap stays at rounding size: loss rtol 1e-5, gradients rtol 1e-4 hold on each CPU path the
suite is checked on (README, Tests)."""

import pytest
import torch

from dsft.data.packing import PackedCollator, pack_best_fit_decreasing, packed_rows
from dsft.models.presets import build_preset

from .test_packed_forward import see_every_key


def test_best_fit_decreasing_by_hand():
    # Longest first: 7 opens bin 0 (free 3), 6 opens bin 1 (free 4), 4 fills bin 1 exactly (the best fit),
    # 3 fills bin 0, 2 and 1 open and share bin 2.
    assert pack_best_fit_decreasing([3, 7, 1, 6, 4, 2], capacity=10) == [[1, 0], [3, 4], [5, 2]]
    assert pack_best_fit_decreasing([], 8) == []
    with pytest.raises(ValueError, match="more than the row budget 4"):
        pack_best_fit_decreasing([5], 4)


def test_every_sample_once_and_no_row_over_budget():
    lengths = [(i * 37) % 29 + 1 for i in range(200)]
    groups = pack_best_fit_decreasing(lengths, 64)
    assert sorted(i for group in groups for i in group) == list(range(200))
    assert all(sum(lengths[i] for i in group) <= 64 for group in groups)
    assert len(groups) == -(-sum(lengths) // 64)  # these lengths pack without waste beyond the last row


def test_collator_restarts_positions_and_masks_first_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "sample_id": 0},
            {"input_ids": [8, 9], "labels": [8, 9], "sample_id": 1}]
    batch = PackedCollator(pad_token_id=0)([rows, rows[:1]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 6, 7, -100, -100]]
    assert batch["sample_id"].tolist() == [0, 1, 0]


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-deepseek-v32", "tiny-qwen2"])
def test_packed_loss_and_gradients_equal_padded(tokenizer, preset):
    torch.manual_seed(0)
    samples = []
    for length in (9, 4, 13, 6, 11):
        ids = torch.randint(10, len(tokenizer), (length,)).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})

    def loss_and_grads(model, batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = see_every_key(build_preset(preset, tokenizer, seed=0, dtype=torch.float32))
    model.config._attn_implementation = "sdpa"
    width = max(len(s["input_ids"]) for s in samples)
    padded = {
        "input_ids": torch.tensor([s["input_ids"] + [0] * (width - len(s["input_ids"])) for s in samples]),
        "attention_mask": torch.tensor([[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in samples]),
        "labels": torch.tensor([s["labels"] + [-100] * (width - len(s["labels"])) for s in samples]),
    }
    packed = PackedCollator(pad_token_id=0)(packed_rows(samples, capacity=24))
    assert packed["input_ids"].shape[0] == 2  # 43 tokens in rows of at most 24
    expected_loss, expected_grads = loss_and_grads(model, padded)
    loss, grads = loss_and_grads(model, packed)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
