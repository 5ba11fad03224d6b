"""The canary's live judgement on known observations: when it steps up, what is worse by how much, the minimum
sample, and that a rollback is final; its config rules."""

import pytest
from pydantic import ValidationError

from dsft.config.serve import CanaryConfig
from dsft.serve.canary import Canary


def canary(**settings) -> Canary:
    base = {"alias": "prod", "primary": "v1", "candidate": "v2", "min_requests": 10, "seed": 0}
    return Canary(CanaryConfig(**{**base, **settings}))


def feed(c: Canary, served: str, count: int, status: int = 200, latency_s: float = 0.1, **checks) -> None:
    for _ in range(count):
        c.observe(served, status, latency_s, checks or None)


def test_steps_rise_after_step_after_requests_candidate_answers_then_complete():
    c = canary(steps=[5, 50, 100], step_after_requests=3, rollback_on=[])
    assert c.percent == 5
    feed(c, "v1", 50)  # the primary's answers do not move the steps
    assert c.percent == 5
    feed(c, "v2", 2)
    assert c.percent == 5
    feed(c, "v2", 1)
    assert c.percent == 50
    feed(c, "v2", 3)
    assert c.percent == 100 and c.state == "stepping"
    feed(c, "v2", 3)
    assert c.percent == 100 and c.state == "completed"


def test_error_rate_is_compared_in_points_after_the_minimum_sample():
    c = canary(steps=[50, 100], step_after_requests=1000, rollback_on=["error_rate"], max_worse_percent=5)
    feed(c, "v1", 20)
    feed(c, "v2", 9, status=500)
    assert c.state == "stepping"  # 9 answers: below min_requests, nothing decided
    feed(c, "v2", 1, status=500)
    assert c.state == "rolled_back" and c.percent == 0 and c.reason.startswith("error_rate 1.000")
    assert all(c.route() == "v1" for _ in range(100))


def test_a_difference_within_the_bound_holds():
    c = canary(percent=50, rollback_on=["error_rate", "p95_latency"], max_worse_percent=5)
    feed(c, "v1", 96)
    feed(c, "v1", 4, status=503)  # 4% errors
    feed(c, "v2", 92)
    feed(c, "v2", 8, status=500)  # 8%: 4 points worse, within 5
    assert c.state == "fixed"
    feed(c, "v2", 10, status=500)  # 18 of 110: 12.4 points worse
    assert c.state == "rolled_back"


def test_p95_latency_is_compared_relative_to_the_primary_s():
    c = canary(percent=50, rollback_on=["p95_latency"], max_worse_percent=10)
    feed(c, "v1", 10, latency_s=1.0)
    feed(c, "v2", 10, latency_s=1.09)  # 9% slower
    assert c.state == "fixed"
    feed(c, "v2", 1, latency_s=1.5)  # p95 of ten 1.09 s and one 1.5 s (numpy's linear interpolation): 1.295 s
    assert c.state == "rolled_back" and c.reason == "p95_latency 1295.0 ms against the primary's 1000.0 ms"


def test_client_errors_are_not_the_candidate_s_fault():
    c = canary(percent=50, rollback_on=["error_rate"])
    feed(c, "v1", 20)
    feed(c, "v2", 50, status=400)
    assert c.state == "fixed" and c.sides["v2"].answered == 0


def test_feedback_and_checks_compare_mean_scores():
    c = canary(percent=50, rollback_on=["feedback"], max_worse_percent=5)
    for _ in range(10):
        c.feedback("v1", 1.0)
        c.feedback("v2", 0.96)
    assert c.state == "fixed"
    c.feedback("v2", 0.0)  # mean 9.6 / 11: 12.7 points below the primary's
    assert c.state == "rolled_back" and c.reason == "feedback 0.873 against the primary's 1.000"
    checked = canary(percent=50, rollback_on=["checks"], checks=[{"name": "cites", "regex": "§"}])
    feed(checked, "v1", 10, cites=1.0)
    feed(checked, "v2", 10, cites=0.0)
    assert checked.state == "rolled_back" and checked.reason.startswith("check cites 0.000")


@pytest.mark.parametrize("settings, message", [
    ({"percent": 10, "steps": [1, 5]}, "exactly one of percent"),
    ({}, "exactly one of percent"),
    ({"steps": [5, 1]}, "rising percents"),
    ({"steps": [0, 5]}, "rising percents"),
    ({"percent": 5, "rollback_on": ["checks"]}, "define them under checks"),
])
def test_canary_config_rules(settings, message):
    with pytest.raises(ValidationError, match=message):
        CanaryConfig(alias="prod", primary="v1", candidate="v2", **settings)
