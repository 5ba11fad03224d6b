"""A NaN injected at a chosen step, and CUDA out-of-memory, through the real trainer."""

import pytest
import torch

import dsft.train.sft as sft
from dsft.config import load_config
from dsft.errors import DsftError, TrainingDiverged
from dsft.train.checkpoints import list_checkpoints

from .conftest import make_config, weights


def inject(monkeypatch, fault):
    """Build the real model, with fault(call_number, batch_size) run on each training forward pass.

    fault may return a replacement output or raise; the model object is kept for inspection.
    """
    built = {}
    real_start_model = sft.rd.start_model

    def start_model(*args, **kwargs):
        model = real_start_model(*args, **kwargs)
        calls = [0]

        def hook(module, inputs, output):
            if not module.training:
                return None
            calls[0] += 1
            return fault(calls[0], output.logits.shape[0], output)

        model.register_forward_hook(hook)
        built["model"] = model
        return model

    monkeypatch.setattr(sft.rd, "start_model", start_model)
    return built


def nan_at(steps):
    def fault(call, batch_size, output):
        if call in steps:
            output.logits = output.logits * float("nan")
            output.loss = output.loss * float("nan") if output.loss is not None else None
        return output

    return fault


def run(tmp_path, tiny_data, **train):
    settings = {"max_steps": 8, "batch_size": 4, "save_steps": 1, "keep_last_checkpoints": 20, **train}
    return sft.run_sft(load_config(make_config(tmp_path, tiny_data, method={"type": "full"}, train=settings)))


def test_nan_stops_before_the_optimizer_applies_it(tmp_path, tiny_data, monkeypatch):
    built = inject(monkeypatch, nan_at({5}))
    with pytest.raises(TrainingDiverged, match="non-finite loss at step 5;.*nothing after step 4 was saved"):
        run(tmp_path, tiny_data)
    root = tmp_path / "run" / "checkpoints"
    assert list_checkpoints(root)[0][0] == 4, "the last good checkpoint stays the newest"
    saved = weights(root / "checkpoint-4")
    in_memory = built["model"].state_dict()
    for name, tensor in saved.items():
        if name in in_memory:
            assert torch.equal(in_memory[name], tensor), f"{name} changed after the NaN step"


def test_skip_policy_skips_the_bad_step_and_counts_it(tmp_path, tiny_data, monkeypatch):
    inject(monkeypatch, nan_at({3}))
    result = run(tmp_path, tiny_data, nonfinite="skip")
    assert result.summary["nonfinite_skipped_steps"] == 1 and result.summary["steps"] == 8
    root = tmp_path / "run" / "checkpoints"
    before, after = weights(root / "checkpoint-2"), weights(root / "checkpoint-3")
    assert all(torch.equal(before[name], after[name]) for name in before), "a skipped step leaves the weights"
    assert not all(torch.equal(after[n], weights(root / "checkpoint-4")[n]) for n in after), "later steps train"


def test_skip_policy_stops_after_too_many_in_a_row(tmp_path, tiny_data, monkeypatch):
    inject(monkeypatch, nan_at(set(range(3, 100))))
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 4 \(2 steps in a row\)"):
        run(tmp_path, tiny_data, nonfinite="skip", max_consecutive_nonfinite=2)


def oom_above(limit):
    def fault(call, batch_size, output):
        if batch_size > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return output

    return fault


def test_out_of_memory_says_what_to_change(tmp_path, tiny_data, monkeypatch):
    inject(monkeypatch, oom_above(2))
    with pytest.raises(DsftError) as info:
        run(tmp_path, tiny_data, save_steps=None)
    message = str(info.value)
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB)" in message
    for advice in ("train.batch_size (now 4)", "data.max_length_tokens", "gradient_checkpointing: true",
                   "method.type: lora", "auto_find_batch_size: true"):
        assert advice in message


def test_automatic_batch_size_search_halves_until_it_fits(tmp_path, tiny_data, monkeypatch):
    inject(monkeypatch, oom_above(2))
    result = run(tmp_path, tiny_data, save_steps=None, auto_find_batch_size=True)
    assert result.summary["steps"] == 8
    assert result.summary["batch_size_used"] == 2
