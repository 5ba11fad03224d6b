"""Trainer callbacks every stage shares: metrics.jsonl, tokens/s, and a rich progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from dsft.train.distributed import is_main

METRICS_FILE = "metrics.jsonl"


class MetricsCallback(TrainerCallback):
    """Appends every log record (loss, lr, grad norm, eval loss, tokens/s) to metrics.jsonl.

    tokens_per_second counts real (non-padding) input tokens between two log records.
    """

    def __init__(self, run_dir: Path, tracker=None):
        self.path = Path(run_dir) / METRICS_FILE
        self.tracker = tracker
        """The stage's MlflowTracker (train/tracking.py), given each record as it is written; None: no tracking."""
        self._last_time_s: float | None = None
        self._last_tokens = 0
        self.last_tokens_per_second: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time_s, self._last_tokens = time.perf_counter(), state.num_input_tokens_seen

    def write(self, record: dict) -> None:
        """Append one record (it must carry "step") to metrics.jsonl (rank 0 only: the logged numbers are global)."""
        if not is_main():
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log_record(record)

    def on_log(self, args, state, control, logs=None, **kwargs):
        record = {"step": state.global_step, "epoch": state.epoch, **(logs or {})}
        if "loss" in record and self._last_time_s is not None:
            now_s, tokens = time.perf_counter(), state.num_input_tokens_seen
            elapsed_s = now_s - self._last_time_s
            if elapsed_s > 0 and tokens > self._last_tokens:
                self.last_tokens_per_second = (tokens - self._last_tokens) / elapsed_s
                record["tokens_per_second"] = round(self.last_tokens_per_second, 1)
            self._last_time_s, self._last_tokens = now_s, tokens
        self.write(record)


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the records of a per-step jsonl log after last_step: a resumed run writes those steps again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


class RichProgressCallback(TrainerCallback):
    """A progress bar with loss, learning rate and tokens/s; eval results are printed as lines."""

    def __init__(self, console, metrics: MetricsCallback):
        self.console = console
        self.metrics = metrics
        self.progress: Progress | None = None
        self.task = None
        self.status_keys: dict[str, str] = {}
        """Further log keys shown after the loss (and on eval lines with their eval_ prefix), by label:
        e.g. {"rewards/margins": "margin"} for a stage whose trainer logs more than the loss."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, status="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.progress is None:
            return
        if "loss" in logs:
            status = f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0.0):.2e}"
            status += self._extra(logs, "")
            if self.metrics.last_tokens_per_second is not None:
                status += f"  {self.metrics.last_tokens_per_second:,.0f} tok/s"
            self.progress.update(self.task, status=status)
        if "eval_loss" in logs:
            line = f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}{self._extra(logs, 'eval_')}"
            self.progress.console.print(line)

    def _extra(self, logs: dict, prefix: str) -> str:
        shown = [(label, logs[prefix + key]) for key, label in self.status_keys.items() if prefix + key in logs]
        return "".join(f"  {label} {value:.4g}" for label, value in shown)

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        """Close the bar; also called when training ends with an exception."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
