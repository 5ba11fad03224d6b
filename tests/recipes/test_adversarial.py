"""Adversarial training end to end: a classifier still learns under FGM, LoRA trains under PGD, the attack is the
same whatever the accumulation, and method none leaves training exactly as it was."""

import json

import pytest

import dsft.train.adversarial
from dsft.config import load_config
from dsft.train.classify import run_classify
from dsft.train.sft import run_sft

from ..learning import NOT_LEARNING, assert_learned, assert_not_learned, learning
from .conftest import make_config, train_losses
from .test_classify import classify_claims, classify_config, labelled_data  # noqa: F401 (a fixture)
from .test_sft import sft_claims

FGM = {"max_steps": 20, "adversarial": {"method": "fgm", "epsilon": 1.0}}


def fgm_classifier(tmp_path, labelled_data, **train) -> dict:  # noqa: F811
    path = classify_config(tmp_path, labelled_data, model={"preset": "tiny-qwen2"}, method={"type": "full"},
                           train={**FGM, **train})
    return run_classify(load_config(path)).summary


@learning
def test_fgm_classifier_learns_the_planted_task(tmp_path, labelled_data):  # noqa: F811
    summary = fgm_classifier(tmp_path, labelled_data)
    assert_learned(classify_claims(summary))
    assert summary["steps"] == 20
    assert summary["adversarial"] == {"method": "fgm", "epsilon": 1.0, "pgd_steps": 3, "pgd_alpha": 0.3}
    ledger = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert all(len(step["sample_ids"]) == 8 for step in ledger)  # the attack passes are not counted as samples


@learning
def test_fgm_classifier_that_does_not_learn_fails_the_claims(tmp_path, labelled_data):  # noqa: F811
    assert_not_learned(classify_claims(fgm_classifier(tmp_path, labelled_data, **NOT_LEARNING)))


PGD = {"max_steps": 12, "adversarial": {"method": "pgd", "epsilon": 0.5, "pgd_steps": 2}}


@learning
def test_pgd_with_lora_on_deepseek_v3_lowers_the_loss(tmp_path, tiny_data):
    # 12 steps and the SFT claim (last 3 steps against the first): 4 steps' loss ratio (0.88 < 1.0) was within the
    # batches' spread of a run that does not learn (step 4 / step 1 = 1.003 there).
    run_sft(load_config(make_config(tmp_path, tiny_data, train=PGD)))
    assert sorted(train_losses(tmp_path / "run")) == list(range(1, 13))
    assert_learned(sft_claims(tmp_path / "run"))


@learning
def test_pgd_that_does_not_learn_fails_the_claims(tmp_path, tiny_data):
    run_sft(load_config(make_config(tmp_path, tiny_data, train={**PGD, **NOT_LEARNING})))
    assert_not_learned(sft_claims(tmp_path / "run"))


def test_fgm_is_the_same_with_gradient_accumulation(tmp_path, tiny_data):
    # The perturbation is normalised per sequence, so how a batch is split does not change the attack. Three steps in
    # this process on one CPU path, sums of other shapes: rel 1e-4 holds on each CPU path the suite is checked on.
    losses = {}
    for batch_size, accumulation in ((8, 1), (4, 2)):
        (tmp_path / f"b{batch_size}").mkdir()
        path = make_config(tmp_path / f"b{batch_size}", tiny_data, model={"preset": "tiny-llama"}, method={"type": "full"},
                           train={"max_steps": 3, "batch_size": batch_size, "grad_accum_steps": accumulation,
                                  "adversarial": {"method": "fgm", "epsilon": 2.0}})
        run_sft(load_config(path))
        losses[batch_size] = train_losses(tmp_path / f"b{batch_size}" / "run")
    assert losses[4] == pytest.approx(losses[8], rel=1e-4)


def test_method_none_hooks_nothing_and_keeps_the_trajectory(tmp_path, tiny_data, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no adversary may be built for method none")

    monkeypatch.setattr(dsft.train.adversarial.EmbeddingAdversary, "__init__", refuse)
    losses = {}
    for name, adversarial in (("default", {}), ("none", {"adversarial": {"method": "none", "epsilon": 5.0}})):
        (tmp_path / name).mkdir()
        path = make_config(tmp_path / name, tiny_data, model={"preset": "tiny-llama"}, method={"type": "full"},
                           train={"max_steps": 3, **adversarial})
        result = run_sft(load_config(path))
        assert not result.model.get_input_embeddings()._forward_hooks
        losses[name] = train_losses(tmp_path / name / "run")
    assert losses["none"] == losses["default"]
