"""`dsft bench --profile`: where a recipe's measured steps spend their time, to say what limits a speed that misses
its target.

The profiled run repeats the recipe (fresh model, same samples, seed and warmup) under torch.profiler from its first
measured step to its last; the timed run stays unprofiled, so its numbers carry no profiler overhead. The summary:
- device: cuda (the GPU kernels' time) or cpu (the operators' self time);
- busy_fraction (CUDA only): kernel time over the wall time of the profiled steps; far below 1, the GPU waits on the
  host (Python, kernel launches, data);
- categories: the share of that time in matmul, attention, loss, optimizer, communication, data loading, memory
  (copies, fills, indexing) and other (elementwise, norms, activations), by the operator or kernel name (CATEGORIES);
- top: the operators or kernels with the most time;
- limited_by: the reading of those numbers in one line.
"""

from __future__ import annotations

import time

CATEGORIES = (
    ("communication", ("nccl", "all_reduce", "allreduce", "reduce_scatter", "all_gather", "gloo")),
    ("attention", ("attention", "attn", "flash", "fmha", "scaled_dot_product", "varlen")),
    ("optimizer", ("adam", "_foreach", "optimizer")),
    ("loss", ("cross_entropy", "crossentropy", "logprob", "log_softmax", "nll_loss", "logsumexp")),
    ("data", ("dataloader",)),
    ("matmul", ("gemm", "matmul", "aten::mm", "addmm", "bmm", "grouped_mm", "cutlass", "xmma", "nvjet", "cublas",
                "linear")),
    ("memory", ("copy", "memcpy", "memset", "fill", "aten::cat", "index", "gather", "scatter", "zero", "clone",
                "contiguous", "pad")),
)
"""(category, name fragments), first match wins on the lower-cased name; anything else is "other"."""

BUSY_HOST_BOUND = 0.7
"""Below this busy fraction the GPU idles for a third of the step or more: the host is what limits."""

TOP_OPERATORS = 12


def category(name: str) -> str:
    """The CATEGORIES entry an operator or kernel name falls in, else "other"."""
    lowered = name.lower()
    for label, fragments in CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return label
    return "other"


def summarize(times_us: dict[str, float], wall_s: float, device: str) -> dict:
    """The profile summary (module docstring) of times_us (microseconds per operator or kernel name) measured over
    wall_s seconds on device (cuda or cpu)."""
    total_us = sum(times_us.values())
    shares: dict[str, float] = {}
    for name, spent_us in times_us.items():
        label = category(name)
        shares[label] = shares.get(label, 0.0) + spent_us / total_us
    top = sorted(times_us.items(), key=lambda item: -item[1])[:TOP_OPERATORS]
    busy = total_us / 1e6 / wall_s if device == "cuda" else None
    return {"device": device, "wall_s": wall_s, "busy_fraction": busy,
            "categories": dict(sorted(shares.items(), key=lambda item: -item[1])),
            "top": [{"name": name, "ms": spent_us / 1e3, "share": spent_us / total_us} for name, spent_us in top],
            "limited_by": _reading(shares, busy, device)}


def _reading(shares: dict[str, float], busy: float | None, device: str) -> str:
    if busy is not None and busy < BUSY_HOST_BOUND:
        return f"the host: the GPU ran kernels {busy:.0%} of the step time (Python, kernel launches, data loading)"
    label, share = max(shares.items(), key=lambda item: item[1])
    where = "of the GPU kernel time" if device == "cuda" else "of the operator time (CPU: no GPU kernels timed)"
    return f"{label}: {share:.0%} {where}"


def step_profiler(first_step: int):
    """A TrainerCallback that profiles from the start of optimizer step first_step (1-based) to the end of training;
    its summary (summarize's dict) is set when training ends."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.profiler = None
            self.started_s = 0.0
            self.summary: dict | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.profiler is None and state.global_step == first_step - 1:  # global_step: steps finished
                activities = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.start()
                self.started_s = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            if self.profiler is None:
                return
            if cuda:
                torch.cuda.synchronize()
            wall_s = time.perf_counter() - self.started_s
            self.profiler.stop()
            self.summary = summarize(_times_us(self.profiler, cuda), wall_s, "cuda" if cuda else "cpu")

    return StepProfiler()


def _times_us(profiler, cuda: bool) -> dict[str, float]:
    """Per name: the GPU kernels' time on CUDA (kernels only, so no time counts twice), else the CPU operators'
    self time."""
    from torch.autograd import DeviceType

    times: dict[str, float] = {}
    for event in profiler.key_averages():
        if cuda and event.device_type != DeviceType.CUDA:
            continue
        spent = event.self_device_time_total if cuda else event.self_cpu_time_total
        if spent > 0:
            times[event.key] = times.get(event.key, 0.0) + spent
    return times
