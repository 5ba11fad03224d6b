"""Shadow deployment: a candidate answers a share of the primary's requests in the background, and only the
primary's answer is ever returned.

A request the draw picks gets the candidate's prompt rendered (its own chat template) when it arrives, and the
candidate's generation starts only after the primary's answer is complete: the client never waits for the shadow.
Shadow jobs are background jobs the batcher runs only when no client request waits, at most max_in_flight at once
(more are skipped and counted), and whatever they do (fail, time out, crawl) ends in the shadow's own counters. Each
compared pair is scored for agreement (exact match and token F1 of the answers, the difference in length and
latency) into /metrics and one JSON line of the report file, without prompt or reply text unless serve.log_prompts.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsft.config.serve import ShadowConfig
from dsft.eval.text_metrics import exact_match, token_f1

log = logging.getLogger("dsft.serve")


@dataclass
class ShadowSummary:
    compared: int = 0
    errors: int = 0
    skipped: int = 0
    exact: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)
    length_difference_tokens: list[int] = field(default_factory=list)
    latency_difference_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        def mean(values):
            return float(np.mean(values)) if values else None

        return {"compared": self.compared, "errors": self.errors, "skipped": self.skipped,
                "exact_match": mean(self.exact), "token_f1": mean(self.f1),
                "mean_length_difference_tokens": mean(self.length_difference_tokens),
                "mean_latency_difference_s": mean(self.latency_difference_s)}


class Shadow:
    """The draw, the in-flight bound, the comparison and the report of one shadow setting."""

    def __init__(self, config: ShadowConfig, metrics, log_prompts: bool):
        self.config, self.metrics, self.log_prompts = config, metrics, log_prompts
        self.summary = ShadowSummary()
        self.in_flight = 0
        self.tasks: set[asyncio.Task] = set()
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()

    def wanted(self, served: str) -> bool:
        """Whether this request of served is to be shadowed (draws only for the primary's requests)."""
        if served != self.config.primary:
            return False
        with self._lock:
            return self._random.random() * 100 < self.config.percent

    def admit(self) -> bool:
        """Take an in-flight place, or count the request as skipped."""
        if self.in_flight >= self.config.max_in_flight:
            self._count("skipped")
            return False
        self.in_flight += 1
        return True

    def done(self) -> None:
        self.in_flight -= 1

    def failed(self, kind: str) -> None:
        self._count("error")
        log.info("shadow %s failed (%s); the primary's reply was not affected", self.config.candidate, kind)

    def compare(self, request_id: str, primary: dict, candidate: dict) -> None:
        """primary and candidate: {answer, tokens, latency_s, prompt?}."""
        exact = exact_match(candidate["answer"], primary["answer"])
        f1 = token_f1(candidate["answer"], primary["answer"])
        length = candidate["tokens"] - primary["tokens"]
        latency = candidate["latency_s"] - primary["latency_s"]
        s, m, names = self.summary, self.metrics, (self.config.primary, self.config.candidate)
        s.compared += 1
        s.exact.append(exact), s.f1.append(f1)
        s.length_difference_tokens.append(length), s.latency_difference_s.append(latency)
        self._count("compared")
        m.shadow_exact.labels(*names).inc(exact)
        m.shadow_f1.labels(*names).observe(f1)
        m.shadow_length_difference.labels(*names).observe(length)
        m.shadow_latency_difference.labels(*names).observe(latency)
        line = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"), "id": request_id,
                "primary": names[0], "candidate": names[1], "exact_match": exact, "token_f1": f1,
                "tokens": {"primary": primary["tokens"], "candidate": candidate["tokens"]},
                "latency_s": {"primary": primary["latency_s"], "candidate": candidate["latency_s"]}}
        if self.log_prompts:
            line.update(prompt=primary.get("prompt"), primary_answer=primary["answer"],
                        candidate_answer=candidate["answer"])
        with Path(self.config.report_file).open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")

    def _count(self, outcome: str) -> None:
        if outcome == "error":
            self.summary.errors += 1
        elif outcome == "skipped":
            self.summary.skipped += 1
        self.metrics.shadow_requests.labels(self.config.primary, self.config.candidate, outcome).inc()

    def write_summary(self) -> Path:
        path = Path(self.config.report_file).with_suffix(".summary.json")
        body = {"primary": self.config.primary, "candidate": self.config.candidate, "percent": self.config.percent,
                **self.summary.as_dict()}
        path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        return path
