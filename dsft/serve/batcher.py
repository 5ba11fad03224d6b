"""Dynamic batching: requests wait in one queue, a worker thread takes them in batches for the model.

A batch holds requests that can share one `generate` call: the same served model (adapter) and the same sampling
settings. Its size is bounded by a limit a PID controller moves after every batch, holding the wall time of one
decoding step (what a streaming client waits between tokens) near target_latency_ms: larger batches give more tokens
per second in all, and each step takes longer. The model is used by the worker thread only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dsft.config.serve import BatchingConfig

log = logging.getLogger("dsft.serve")

STRAGGLER_SHARE = 0.2
"""On a busy server a batch waits for stragglers at most this share of the last batch's wall time."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; temperature 0 is greedy (top_p unused)."""

    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(eq=False)
class Job:
    """One request's generation. deliver is called from the worker thread with ("token", id) events (a job that
    is not per_token gets its first token so, and the rest as one ("tokens", [ids]) before its end), then one
    ("end", "stop" | "length" | "cancelled") or ("error", message); it must not block."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    model: str
    """Served model name (the engine knows which adapter it is)."""
    deliver: Callable[[tuple], None]
    enqueued_s: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    per_token: bool = True
    """Whether its client needs each token as it comes (a stream, stop strings); else one wake-up per reply, not
    per token, on the server's event loop."""

    prompt_length: int | None = None
    """Set where the model must never see padding (DeepSeek-V4, models/unpadded.py): a batch then holds prompts of
    this one length; None lets prompts of any length share a batch."""
    background: bool = False
    """A job nobody waits for (a shadow's): it is taken only when no client's job waits."""

    @property
    def group(self) -> tuple:
        return self.model, self.sampling, self.prompt_length


class QueueFull(Exception):
    """The queue holds max_queue requests already."""


class JobRefused(ValueError):
    """The engine cannot serve this kind of request (the message says why and what to send instead)."""


class LatencyController:
    """PID loop (velocity form) from the step latency to the batch limit.

    The error is relative, (target - measured) / target, and the output is in units of max_batch, so the gains do
    not depend on the model's speed. The velocity form accumulates into the limit itself, which is clamped to
    [min_batch, max_batch]: a saturated limit cannot wind up. A batch smaller than the limit says nothing about
    whether the limit could grow, so under target it leaves the limit as it is.
    """

    def __init__(self, config: BatchingConfig):
        self._config = config
        self.limit = float(config.max_batch)
        self._errors = [0.0, 0.0]  # the two previous errors (e_{k-1}, e_{k-2})

    @property
    def batch_limit(self) -> int:
        return max(self._config.min_batch, min(self._config.max_batch, int(self.limit + 1e-9)))

    def update(self, batch_size: int, step_latency_ms: float) -> int:
        """Feed one batch's measured step latency; returns the new batch limit."""
        c = self._config
        error = (c.target_latency_ms - step_latency_ms) / c.target_latency_ms
        if error > 0 and batch_size < self.batch_limit:
            return self.batch_limit
        previous, before = self._errors
        change = c.kp * (error - previous) + c.ki * error + c.kd * (error - 2 * previous + before)
        self.limit = min(float(c.max_batch), max(float(c.min_batch), self.limit + change * c.max_batch))
        self._errors = [error, previous]
        return self.batch_limit


class Batcher:
    """The request queue and the worker thread that runs batches through run_batch.

    run_batch(jobs) generates for one batch, delivers every token and end to the jobs, and returns the number of
    decoding steps it ran; if it raises, each job gets ("error", ...) and the worker goes on with the next batch.
    """

    def __init__(self, run_batch: Callable[[list[Job]], int], config: BatchingConfig, metrics=None):
        self._run_batch, self._config, self._metrics = run_batch, config, metrics
        self.controller = LatencyController(config)
        self._queue: deque[Job] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._last_batch_s, self._last_end_s = 0.0, 0.0
        self._demand: dict[tuple, int] = {}  # group -> its jobs in the last batch plus those left waiting then
        self._thread: threading.Thread | None = None
        self._set_gauges()

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when max_queue live jobs are waiting (jobs whose clients left or timed out
        hold no place: they are ended and dropped first)."""
        with self._condition:
            self._drop_cancelled()
            if len(self._queue) >= self._config.max_queue:
                raise QueueFull
            self._queue.append(job)
            self._set_gauges()
            self._condition.notify()

    def queue_depth(self) -> int:
        """Live jobs waiting."""
        with self._condition:
            self._drop_cancelled()
            return len(self._queue)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dsft-serve-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the running batch; jobs still queued are ended as cancelled."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        for job in self._queue:
            job.deliver(("end", "cancelled"))
        self._queue.clear()

    def next_batch(self) -> list[Job] | None:
        """Wait for work, then take the oldest job and up to limit - 1 more of its group, oldest first.

        Before taking, the worker waits for company while fewer of the oldest job's group wait than its demand:
        the jobs of that group its last batch held plus those that were still waiting then (in a steady load,
        the clients the last batch answered send their next requests now; without the wait, clients split into
        halves whose batches alternate, each half the size it could be). At least 2 are wanted, at most the limit.
        The wait ends max_wait_ms after the oldest job arrived or, when more than one job is expected, after
        STRAGGLER_SHARE of the last batch's wall time has passed since it ended (the wait costs at most that share
        of throughput), whichever is later. Returns None when stopping.
        """
        with self._condition:
            while not self._stopping and not self._live_queue():
                self._condition.wait()
            if self._stopping:
                return None
            head = self._head()
            limit, group = self.controller.batch_limit, head.group
            demand = self._demand.get(group, 1)
            give_up_s = head.enqueued_s + self._config.max_wait_ms / 1000
            if demand > 1:
                give_up_s = max(give_up_s, self._last_end_s + STRAGGLER_SHARE * self._last_batch_s)
            while not self._stopping and sum(job.group == group for job in self._queue) < min(limit, max(2, demand)):
                left_s = give_up_s - time.perf_counter()
                if left_s <= 0:
                    break
                self._condition.wait(left_s)
            return None if self._stopping else self._take(limit)

    def _live_queue(self) -> bool:
        """Whether a job not yet cancelled waits."""
        self._drop_cancelled()
        return bool(self._queue)

    def _drop_cancelled(self) -> None:
        """End and drop the queued jobs whose clients left or timed out (called with the condition held)."""
        if not any(job.cancelled.is_set() for job in self._queue):
            return
        live: deque[Job] = deque()
        for job in self._queue:
            if job.cancelled.is_set():
                job.deliver(("end", "cancelled"))
            else:
                live.append(job)
        self._queue = live
        self._set_gauges()

    def _head(self) -> Job:
        """The job a batch is built around: the oldest client job, else the oldest background one."""
        return next((job for job in self._queue if not job.background), self._queue[0])

    def _take(self, limit: int) -> list[Job]:
        self._drop_cancelled()  # the oldest job's client may have left while the worker waited for company
        if not self._queue:
            return []
        group = self._head().group
        batch, rest = [], deque()
        for job in self._queue:
            if job.group == group and len(batch) < limit:
                batch.append(job)
            else:
                rest.append(job)
        self._queue = rest
        self._demand[group] = len(batch) + sum(job.group == group for job in rest)
        self._set_gauges()
        return batch

    def _loop(self) -> None:
        while (batch := self.next_batch()) is not None:
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        started_s = time.perf_counter()
        try:
            steps = self._run_batch(batch)
        except Exception as exc:  # a failing batch must not stop the server: its requests get a 500
            log.exception("generation failed for a batch of %d requests", len(batch))
            for job in batch:
                job.deliver(("error", f"generation failed: {type(exc).__name__}"))
            return
        self._last_end_s = time.perf_counter()
        self._last_batch_s = self._last_end_s - started_s
        step_latency_ms = self._last_batch_s * 1000 / max(1, steps)
        self.controller.update(len(batch), step_latency_ms)
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch))
            self._metrics.step_latency.observe(step_latency_ms / 1000)
        self._set_gauges()

    def _set_gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._queue))
            self._metrics.batch_limit.set(self.controller.batch_limit)
