"""Padding-free DPO: exact packing and unpacking, and a packed DPO step's loss and gradients equal the padded step's
(TRL's DPOTrainer as build_dpo_trainer makes it; eager and sdpa attention; a frozen reference copy and LoRA's
adapter-disabled reference).

Tolerances: both sides run in this process, on whatever CPU path it has, through sums of different shapes (one row of
many sequences against padded rows), so they are equal up to rounding, not bitwise; one forward and backward, no
optimizer step, so the gap stays at rounding size: loss rtol 1e-5, gradients rtol 1e-4 hold on each CPU path the
suite is checked on (README, Tests)."""

import pytest
import torch

from dsft.config import RunConfig
from dsft.errors import DsftError
from dsft.train import packed_pairs
from dsft.train.packed_pairs import pack_rows, pack_trainer_forwards, unpack_per_token
from dsft.train.trl_stage import check_stage_config

from .test_dpo_loss import dsft_trainer, rows  # noqa: F401  (rows: the pairs fixture)


def test_pack_rows_restarts_positions_and_ignores_each_first_label():
    input_ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    attention_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    labels = torch.tensor([[-100, 6, 7], [8, 9, -100]])
    packed_ids, position_ids, packed_labels = pack_rows(input_ids, attention_mask, labels)
    assert packed_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert packed_labels.tolist() == [[-100, 6, 7, -100, 9]]


def test_unpack_puts_each_prediction_under_its_padded_position():
    attention_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # Packed predictions 0..3 read tokens 1..4: 6, 7, then 8 (across the boundary, ignored: 0), then 9.
    values = torch.tensor([[1.0, 2.0, 0.0, 4.0]], requires_grad=True)
    unpacked = unpack_per_token(values, attention_mask)
    assert unpacked.tolist() == [[1.0, 2.0], [4.0, 0.0]]
    unpacked.sum().backward()
    assert values.grad.tolist() == [[1.0, 1.0, 0.0, 1.0]]


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("method, attention", [("full", "sdpa"), ("full", "eager"), ("lora", "sdpa")])
def test_packed_dpo_step_equals_padded(tmp_path, tokenizer, rows, method, attention, monkeypatch):  # noqa: F811
    packed_batches = []
    monkeypatch.setattr(packed_pairs, "pack_rows", lambda *tensors: packed_batches.append(1) or pack_rows(*tensors))
    trainer = dsft_trainer(tmp_path, tokenizer, rows, method, "sigmoid")
    for model in (trainer.model, trainer.ref_model):
        if model is not None:
            model.config._attn_implementation = attention
    batch = trainer.data_collator(rows)
    assert (batch["attention_mask"] == 0).any()  # the pairs differ in length: the padded step has padding
    expected_loss, expected_grads = loss_and_grads(trainer, batch)
    pack_trainer_forwards(trainer)
    loss, grads = loss_and_grads(trainer, batch)
    assert len(packed_batches) == 2  # the policy's pass and the reference's ran packed
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_pair_stages_pack_batches_and_refuse_a_row_budget():
    def config(stage: str, **train) -> RunConfig:
        return RunConfig.model_validate({"stage": stage, "model": {"preset": "tiny-qwen2"},
                                         "data": {"train_files": ["unused.jsonl"], "max_length_tokens": 48},
                                         "train": train})

    for stage in ("dpo", "reward"):
        with pytest.raises(DsftError, match=f"train.pack_tokens is not supported by stage {stage}"):
            check_stage_config(config(stage, packing=True, pack_tokens=64))
        check_stage_config(config(stage, packing=True))
