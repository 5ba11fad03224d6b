"""Generation speed and memory: time to first token, ms per token, tokens/s at batch 1 and batch N.

Measured with greedy decoding forced to a fixed length (eos ignored), after one warm-up, the
median of a few repeats; the device and dtype are named with the numbers. This is a measurement
for reports, never a test assertion.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from dsft.models.generate import pad_left

REPEATS = 3


def _timed_generate_s(model, input_ids, attention_mask, new_tokens: int, pad_id: int) -> float:
    import torch

    def sync() -> None:
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    start_s = time.perf_counter()
    with torch.no_grad():
        model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # a fixed length makes runs comparable
            do_sample=False,
            pad_token_id=pad_id,
        )
    sync()
    return time.perf_counter() - start_s


def _median_s(model, prompts: Sequence[list[int]], new_tokens: int, pad_id: int) -> float:
    input_ids, attention_mask = pad_left(prompts, pad_id)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return statistics.median(_timed_generate_s(model, input_ids, attention_mask, new_tokens, pad_id) for _ in range(REPEATS))


def peak_memory_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def process_peak_memory() -> dict:
    """Peak memory of this process: CUDA allocator peak when on GPU, resident set size always."""
    import resource

    import torch

    peak = {"cpu_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        peak["cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return peak


def measure_speed(model, prompts: Sequence[list[int]], pad_id: int, batch_size: int, new_tokens: int) -> dict:
    """Speed of model on the first prompts; prompts must hold at least one entry."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = [prompts[0]]
    _median_s(model, first, 2, pad_id)  # warm-up: kernels, caches, allocator
    first_token_s = _median_s(model, first, 1, pad_id)
    batch1_s = _median_s(model, first, new_tokens, pad_id)
    batch = [prompts[i % len(prompts)] for i in range(batch_size)]
    batch_s = _median_s(model, batch, new_tokens, pad_id)
    model.train(was_training)
    return {
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "new_tokens": new_tokens,
        "time_to_first_token_ms": round(first_token_s * 1e3, 2),
        "ms_per_token_batch1": round((batch1_s - first_token_s) / (new_tokens - 1) * 1e3, 3),
        "tokens_per_second_batch1": round(new_tokens / batch1_s, 1),
        "batch_size": batch_size,
        "tokens_per_second_batch": round(batch_size * new_tokens / batch_s, 1),
        "peak_memory_bytes": peak_memory_bytes(device),
    }
