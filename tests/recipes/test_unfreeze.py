"""Progressive unfreezing end to end: weights move exactly from their scheduled steps, in SFT and classification,
with full fine-tuning and LoRA, and a resume in the middle of the schedule continues the same trajectory."""

import itertools
import shutil

import pytest
import torch
from transformers import TrainerCallback

import dsft.train.classify
import dsft.train.sft
from dsft.config import load_config
from dsft.train.classify import run_classify
from dsft.train.sft import run_sft

from .conftest import make_config, read_metrics, train_losses
from .test_classify import classify_config, labelled_data  # noqa: F401 (a fixture)

SCHEDULE = [{"step": 0, "layers": 0}, {"step": 3, "layers": 1}, {"step": 6, "layers": "all"}]


class Snapshots(TrainerCallback):
    """Every weight after each optimizer step (step 0: as training starts) and the names that train in each step."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.trained: dict[int, set[str]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.trained[state.global_step + 1] = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.on_train_begin(args, state, control, model)

    def steps_that_changed(self, name: str) -> list[int]:
        steps = sorted(self.weights)
        return [after for before, after in itertools.pairwise(steps)
                if not torch.equal(self.weights[before][name], self.weights[after][name])]


@pytest.fixture
def record(monkeypatch):
    """record() adds fresh Snapshots to the trainer of whichever stage runs next, and returns them."""
    stages = {stage: stage.build_trainer for stage in (dsft.train.sft, dsft.train.classify)}

    def install() -> Snapshots:
        recorder = Snapshots()
        for stage, build_trainer in stages.items():
            monkeypatch.setattr(stage, "build_trainer", _with_callback(build_trainer, recorder))
        return recorder
    return install


def _with_callback(build_trainer, callback):
    def build(*args, **kwargs):
        trainer, guards = build_trainer(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer, guards
    return build


def test_full_sft_weights_move_exactly_from_their_steps_and_resume_keeps_the_schedule(tmp_path, tiny_data, record):
    path = make_config(tmp_path, tiny_data, model={"preset": "tiny-llama"}, method={"type": "full", "unfreeze": SCHEDULE},
                       train={"max_steps": 8, "save_steps": 4, "weight_decay": 0.1, "lr_scheduler": "constant"})
    straight = record()
    result = run_sft(load_config(path))
    names = list(straight.weights[0])
    # Frozen weights stay bit-identical (weight decay included) until their step, then move at every step.
    expected_from = {"lm_head.weight": 1, "model.norm.weight": 1}
    expected_from |= {n: 4 for n in names if n.startswith("model.layers.3.")}
    expected_from |= {n: 7 for n in names if n.startswith(("model.layers.0.", "model.layers.1.", "model.layers.2.", "model.embed"))}
    assert len(expected_from) == len(names)
    for name in names:
        assert straight.steps_that_changed(name) == list(range(expected_from[name], 9)), name
    assert straight.trained[4] - straight.trained[3] == {n for n in names if n.startswith("model.layers.3.")}

    run_dir = tmp_path / "run"
    records = read_metrics(run_dir)
    changes = [(r["step"], r["trainable_layers"]) for r in records if "trainable_layers" in r]
    assert changes == [(0, []), (3, [3]), (6, [0, 1, 2, 3])]
    counts = {r["step"]: r["trainable_parameters"] for r in records if "loss" in r}
    total = sum(p.numel() for p in result.model.parameters())
    assert counts[1] == counts[3] < counts[4] == counts[6] < counts[7] == counts[8] == total
    assert result.summary["unfreeze"] == SCHEDULE

    # Resume from the checkpoint of step 4, between two entries: the same state, losses and log.
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-8")
    resumed = record()
    straight_losses = train_losses(run_dir)
    run_sft(load_config(path), resume=True)
    assert min(resumed.weights) == 4 and resumed.trained[5] == straight.trained[5] and resumed.trained[7] == straight.trained[7]
    for name in names:
        assert resumed.steps_that_changed(name) == list(range(max(expected_from[name], 5), 9)), name
    for step in range(5, 9):  # the same shapes on the same CPU path: equal to rounding on any path
        assert train_losses(run_dir)[step] == pytest.approx(straight_losses[step], rel=1e-6, abs=1e-7)
    assert [(r["step"], r["trainable_layers"]) for r in read_metrics(run_dir) if "trainable_layers" in r] == changes


def test_lora_classifier_trains_its_head_first_then_the_adapters_of_the_top_layers(tmp_path, labelled_data, record):  # noqa: F811
    path = classify_config(tmp_path, labelled_data, model={"preset": "tiny-qwen2"},
                           method={"type": "lora", "lora": {"r": 8, "alpha": 64},
                                   "unfreeze": [{"step": 0, "layers": 0}, {"step": 2, "layers": 2}]},
                           train={"max_steps": 4, "logging_steps": 1})
    snapshots = record()
    run_classify(load_config(path))
    head = "base_model.model.score.modules_to_save.default.weight"
    assert snapshots.trained[1] == snapshots.trained[2] == {head}
    assert {n for n in snapshots.trained[3] if n != head} == {
        n for n in snapshots.weights[0] if "lora_" in n and (".layers.2." in n or ".layers.3." in n)}
    assert snapshots.steps_that_changed(head) == [1, 2, 3, 4]
    for name in snapshots.weights[0]:
        if "lora_B" in name:  # lora_A moves only once lora_B is no longer zero
            assert snapshots.steps_that_changed(name) == ([3, 4] if ".layers.2." in name or ".layers.3." in name else []), name
    changes = [(r["step"], r["trainable_layers"]) for r in read_metrics(tmp_path / "run") if "trainable_layers" in r]
    assert changes == [(0, []), (2, [2, 3])]
