"""The regression gate's judgement on known per-example scores: drops, the paired interval, the noise rule, checks;
and the registry's reference and store rules."""

import numpy as np
import pytest

from dsft.errors import DsftError
from dsft.lifecycle.gate import parse_percent
from dsft.lifecycle.gate_math import check_regressions, judge, paired_change_interval, relative_drop_percent
from dsft.lifecycle.registry import Ref, store_uri


def test_relative_drop_is_percent_of_the_baseline_and_a_rise_for_perplexity():
    assert relative_drop_percent("exact_match", 0.8, 0.7) == pytest.approx(12.5)
    assert relative_drop_percent("exact_match", 0.5, 0.6) == pytest.approx(-20.0)
    assert relative_drop_percent("perplexity", 10.0, 11.0) == pytest.approx(10.0)
    assert relative_drop_percent("f1", 0.0, 0.0) == 0.0


def test_the_paired_interval_resamples_the_same_examples_for_both():
    # Identical scores: every resample changes nothing.
    assert paired_change_interval([1, 0, 1, 1], [1, 0, 1, 1], 200, 0, 0.95) == (0.0, 0.0)
    # The candidate fails everything the baseline passed: -100% in every resample.
    assert paired_change_interval([1] * 8, [0] * 8, 200, 0, 0.95) == (-100.0, -100.0)
    # Examples one side did not score are left out of both; under two pairs there is no interval.
    assert paired_change_interval([1, None, 1], [None, 1, 0], 200, 0, 0.95) is None


def test_the_interval_matches_a_direct_bootstrap():
    baseline = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    candidate = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    rng = np.random.default_rng(3)
    changes = []
    for _ in range(500):
        idx = rng.integers(0, 10, size=10)
        b, c = np.mean(np.array(baseline)[idx]), np.mean(np.array(candidate)[idx])
        changes.append(100 * (c - b) / b)
    expected = (np.percentile(changes, 2.5), np.percentile(changes, 97.5))
    assert paired_change_interval(baseline, candidate, 500, 3, 0.95) == pytest.approx(expected)


def test_a_drop_within_the_bound_passes_and_a_real_one_fails():
    ok = judge("exact_match", 0.80, 0.78, (-6.0, 1.0), 5.0, False)
    assert ok.passed and ok.drop_percent == pytest.approx(2.5) and "within the 5% bound" in ok.why
    real = judge("exact_match", 0.80, 0.60, (-40.0, -10.0), 5.0, False)
    assert not real.passed and "a real drop" in real.why


def test_a_drop_inside_the_noise_is_said_so_and_decided_by_require_significance():
    noisy = judge("exact_match", 0.80, 0.70, (-37.5, 0.0), 5.0, False)
    assert not noisy.passed and "inside the noise" in noisy.why and "require_significance would pass" in noisy.why
    allowed = judge("exact_match", 0.80, 0.70, (-37.5, 0.0), 5.0, True)
    assert allowed.passed and "not counted under require_significance" in allowed.why
    # Without per-example scores (BLEU) nothing tells noise apart: a drop beyond the bound fails either way.
    assert not judge("bleu", 30.0, 20.0, None, 5.0, True).passed


def test_perplexity_rising_is_a_drop_and_its_interval_is_turned_around():
    verdict = judge("perplexity", 10.0, 12.0, None, 5.0, False)
    assert not verdict.passed and verdict.drop_percent == pytest.approx(20.0)
    assert judge("perplexity", 10.0, 9.0, (5.0, 15.0), 5.0, False).interval_percent == (-15.0, -5.0)


def test_check_regressions_are_the_cases_a_candidate_newly_fails():
    assert check_regressions([1, 1, 0, 1, None], [1, 0, 1, 0, 0]) == [1, 3]
    assert check_regressions([0.5, 1.0], [0.4, 1.0]) == [0]


def test_registry_references():
    assert Ref.parse("registry:support@production") == Ref("support", "production")
    assert Ref.parse("support@3") == Ref("support", "3") and Ref.parse("support") == Ref("support", None)
    for bad in ("support@staging", "sup port", "@1", ""):
        with pytest.raises(DsftError, match="a registry reference is NAME"):
            Ref.parse(bad)


def test_the_store_is_explicit_then_mlflow_s_variables_then_mlflow_db_here(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert store_uri() == f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store_uri() == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///r.db")
    assert store_uri() == "sqlite:///r.db" and store_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_percent_options():
    assert parse_percent("5%", "--max-drop") == 5.0 and parse_percent("2.5", "--max-drop") == 2.5
    with pytest.raises(DsftError, match="between 0% and 100%"):
        parse_percent("150%", "--max-drop")
