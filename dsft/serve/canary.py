"""The canary: an alias's traffic split between a primary and a candidate, a fixed share or rising step by step
while the candidate's live metrics hold, and rolled back to the primary at once when one does not.

Both sides are watched over the same period (since the server started): server errors (5xx) per answered request,
the 95th-percentile latency, the mean user feedback score and each online check's pass rate. The candidate is
worse when its rate or score is lower (errors: higher) than the primary's by more than max_worse_percent points,
or its p95 latency is above the primary's by more than max_worse_percent percent; a metric decides only once both
sides have min_requests samples. A rollback sends every request of the alias to the primary from then on, logs the
reason, counts it in /metrics and reaches the registry through on_rollback.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dsft.config.serve import CanaryConfig

log = logging.getLogger("dsft.serve")

LATENCY_WINDOW = 2000
"""Latencies kept per side for the p95 (the most recent)."""


@dataclass
class SideStats:
    """What one side of the canary did: answered requests, server errors, latencies, feedback, check passes."""

    answered: int = 0
    errors: int = 0
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    feedback: list[float] = field(default_factory=list)
    checks: dict[str, list[float]] = field(default_factory=dict)

    def p95_s(self) -> float:
        return float(np.percentile(list(self.latencies_s), 95))


class Canary:
    """Routes an alias's requests and watches both sides; thread-safe (the event loop and check threads call it)."""

    def __init__(self, config: CanaryConfig, metrics=None, on_rollback: Callable[[str], None] | None = None):
        self.config, self.metrics, self.on_rollback = config, metrics, on_rollback
        self.percent = config.start_percent
        self.state = "stepping" if config.steps else "fixed"
        self.reason: str | None = None
        self.sides = {config.primary: SideStats(), config.candidate: SideStats()}
        self._at_step = 0  # candidate answers at the current step
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()  # random.Random and the stats are shared between threads
        self._set_gauge()

    def route(self) -> str:
        with self._lock:
            draw = self._random.random()
            return self.config.candidate if draw * 100 < self.percent else self.config.primary

    def observe(self, served: str, status: int, latency_s: float, checks: dict[str, float] | None = None) -> None:
        """One request of either side answered (status 200) or failed by the server (5xx); 4xx are the client's."""
        if served not in self.sides or 400 <= status < 500:
            return
        with self._lock:
            side = self.sides[served]
            side.answered += 1
            side.errors += status >= 500
            if status < 500:
                side.latencies_s.append(latency_s)
                for name, value in (checks or {}).items():
                    side.checks.setdefault(name, []).append(value)
            if served == self.config.candidate:
                self._at_step += 1
            self._judge()

    def feedback(self, served: str, score: float) -> None:
        if served not in self.sides:
            return
        with self._lock:
            self.sides[served].feedback.append(score)
            self._judge()

    def snapshot(self) -> dict:
        with self._lock:
            return {"percent": self.percent, "state": self.state, "reason": self.reason,
                    **{name: {"answered": s.answered, "errors": s.errors} for name, s in self.sides.items()}}

    def _judge(self) -> None:
        """(lock held) Roll back on the first watched metric that is worse, else step up when the step is done."""
        if self.state == "rolled_back":
            return
        reason = self._worse()
        if reason is not None:
            self._roll_back(reason)
        elif self.state == "stepping" and self._at_step >= self.config.step_after_requests:
            self._step_up()

    def _worse(self) -> str | None:
        c = self.config
        primary, candidate = self.sides[c.primary], self.sides[c.candidate]
        bound = c.max_worse_percent
        if "error_rate" in c.rollback_on and min(primary.answered, candidate.answered) >= c.min_requests:
            rates = primary.errors / primary.answered, candidate.errors / candidate.answered
            if 100 * (rates[1] - rates[0]) > bound:
                return f"error_rate {rates[1]:.3f} against the primary's {rates[0]:.3f}"
        if "p95_latency" in c.rollback_on and min(len(primary.latencies_s), len(candidate.latencies_s)) >= c.min_requests:
            p95 = primary.p95_s(), candidate.p95_s()
            if p95[1] > p95[0] * (1 + bound / 100):
                return f"p95_latency {p95[1] * 1000:.1f} ms against the primary's {p95[0] * 1000:.1f} ms"
        pairs = []
        if "feedback" in c.rollback_on:
            pairs.append(("feedback", primary.feedback, candidate.feedback))
        if "checks" in c.rollback_on:
            pairs += [(f"check {k.name}", primary.checks.get(k.name, []), candidate.checks.get(k.name, []))
                      for k in c.checks]
        for name, ours, theirs in pairs:
            if min(len(ours), len(theirs)) >= c.min_requests:
                means = float(np.mean(ours)), float(np.mean(theirs))
                if 100 * (means[0] - means[1]) > bound:
                    return f"{name} {means[1]:.3f} against the primary's {means[0]:.3f}"
        return None

    def _step_up(self) -> None:
        later = [step for step in self.config.steps if step > self.percent]
        if not later:
            self.state = "completed"
            log.info("canary %s: %s takes %g%% of the traffic; the last step held", self.config.alias,
                     self.config.candidate, self.percent)
            return
        self.percent, self._at_step = later[0], 0
        log.info("canary %s: %s's metrics held; its share rises to %g%%", self.config.alias, self.config.candidate,
                 self.percent)
        self._set_gauge()

    def _roll_back(self, reason: str) -> None:
        self.percent, self.state, self.reason = 0.0, "rolled_back", reason
        log.warning("canary %s rolled back: %s is worse than %s by more than %g: %s; all traffic goes to the "
                    "primary", self.config.alias, self.config.candidate, self.config.primary,
                    self.config.max_worse_percent, reason)
        if self.metrics is not None:
            self.metrics.canary_rollbacks.labels(self.config.alias, self.config.candidate,
                                                 reason.split(" ")[0]).inc()
        self._set_gauge()
        if self.on_rollback is not None:
            threading.Thread(target=self.on_rollback, args=(reason,), name="dsft-canary-rollback",
                             daemon=True).start()  # the registry write never holds up a request

    def _set_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.canary_percent.labels(self.config.alias, self.config.candidate).set(self.percent)
