"""What `dsft bench` measures and how it judges: FLOPs per real token, MFU, step timing, real-token counting, and the
correctness gate that refuses a speed whose loss or gradients show the recipe did not train the same model.

FLOPs (real tokens only; a sample of n tokens):
    LoRA:    n * (4 N + 6 L H (d_qk + d_v) n)
    full FT: n * (6 N + 6 L H (d_qk + d_v) n)
N counts the matrix-multiply weights a token passes through (attention, MLP, active experts and router, lm_head;
not the embedding lookup); L layers, H query heads, d_qk and d_v the query/key and value head sizes. LoRA skips the
frozen weights' gradients (4 N instead of 6 N); attention has no weights, so its term is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import time

PEAK_TFLOPS = (800.0, 989.0)
"""bf16 dense peaks MFU is reported against: 800 (about what an H100/H200 matrix product reaches here) and 989
(the H100 SXM datasheet)."""

LOSS_TOLERANCE = 0.01
"""A recipe's mean loss over the measured steps may differ from B0's by at most this fraction."""


def matmul_params(shape: dict) -> int:
    """Matrix-multiply weights per token of shape (published config.json fields); active ones for MoE.

    Counted on the model built from shape on the meta device (no memory), so every architecture transformers has
    counts the same way: each weight matrix a token is multiplied by (linear layers, routers, V4's compressors,
    indexers and hyper-connection mappings, the lm_head), each fused expert tensor for the num_experts_per_tok of
    its experts a token reaches; not the embedding lookup, norms, biases or V4's additive position biases.
    """
    return _meta_matmul_params(json.dumps(shape, sort_keys=True))


@functools.cache
def _meta_matmul_params(shape_json: str) -> int:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from dsft.models.shapes import shape_config

    shape = json.loads(shape_json)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(shape_config(shape))
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = head.numel()
    for name, weight in model.named_parameters():
        if weight is embedding or weight is head or weight.dim() < 2 or name.endswith("position_bias"):
            continue
        # A fused expert tensor (experts, out, in): a token passes through num_experts_per_tok of them.
        total += weight.numel() * shape["num_experts_per_tok"] // weight.shape[0] if weight.dim() == 3 else weight.numel()
    return int(total)


def qk_v_head_dims(shape: dict) -> tuple[int, int]:
    """(d_qk, d_v): MLA's nope + rope query/key size and its value size, else the head size twice."""
    if "qk_nope_head_dim" in shape:
        return shape["qk_nope_head_dim"] + shape["qk_rope_head_dim"], shape["v_head_dim"]
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    return head_dim, head_dim


def sample_flops(shape: dict, method: str, tokens: int) -> float:
    """Training FLOPs of one sample of tokens real tokens (module docstring)."""
    d_qk, d_v = qk_v_head_dims(shape)
    per_weight = 6 if method == "full" else 4
    attention = 6 * shape["num_hidden_layers"] * shape["num_attention_heads"] * (d_qk + d_v) * tokens
    return tokens * (per_weight * matmul_params(shape) + attention)


def mfu(flops_per_s: float) -> dict[str, float]:
    """Model FLOPs utilization against each of PEAK_TFLOPS, keyed "mfu_800" and "mfu_989"."""
    return {f"mfu_{peak:.0f}": flops_per_s / (peak * 1e12) for peak in PEAK_TFLOPS}


def gate(losses: list[float], grad_norms: list[float], reference_loss: float | None) -> str | None:
    """Why a recipe's speed must not be reported, or None: a non-finite loss, a zero or non-finite gradient norm at a
    measured step, or a mean loss more than LOSS_TOLERANCE from the reference's (B0's; None for B0 itself)."""
    if not losses or not all(math.isfinite(x) for x in losses):
        return "non-finite or missing loss"
    for step, norm in enumerate(grad_norms, 1):
        if not math.isfinite(norm) or norm == 0:
            return f"gradient norm {norm} at measured step {step}: the step did not train"
    if reference_loss is None:
        return None
    mean = sum(losses) / len(losses)
    difference = abs(mean - reference_loss) / abs(reference_loss)
    if difference > LOSS_TOLERANCE:
        return (f"mean loss {mean:.4f} differs from B0's {reference_loss:.4f} by {100 * difference:.2f}% "
                f"(more than {100 * LOSS_TOLERANCE:.0f}%)")
    return None


def sample_lengths(batch: dict) -> list[int]:
    """Real tokens of each sample in a collated batch: attention-mask row sums (padded), else the runs of
    position ids restarting at 0 (padding-free rows)."""
    if "attention_mask" in batch:
        return [int(n) for n in batch["attention_mask"].sum(dim=1).tolist()]
    lengths = []
    for row in batch["position_ids"].tolist():
        starts = [i for i, position in enumerate(row) if position == 0] + [len(row)]
        lengths.extend(end - start for start, end in itertools.pairwise(starts))
    return lengths


class CountingCollator:
    """Wraps a collator and records the sample lengths of every batch it makes, in order."""

    def __init__(self, collate):
        self.collate = collate
        self.batches: list[list[int]] = []

    def __call__(self, features):
        batch = self.collate(features)
        self.batches.append(sample_lengths(batch))
        return batch


def step_meter(warmup_steps: int):
    """A TrainerCallback timing optimizer steps: the device is synchronized at each step end, so a step's time holds
    its kernels. Its ends_s lists the perf_counter of each end."""
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        def __init__(self):
            self.ends_s: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize()
            self.ends_s.append(time.perf_counter())

    return StepMeter()


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclasses.dataclass
class Measured:
    """The measured steps of one recipe (after the warmup steps)."""

    losses: list[float]
    grad_norms: list[float]
    seconds: float
    real_tokens: int
    flops: float

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)


def measured_steps(log_history: list[dict], ends_s: list[float], batches: list[list[int]], warmup_steps: int,
                   shape: dict, method: str, batches_per_step: int = 1) -> Measured:
    """The steps after warmup_steps: their logged losses and gradient norms, wall time, real tokens and FLOPs
    (step s accumulated batches[(s - 1) * batches_per_step : s * batches_per_step]; the data loader may have
    collated more)."""
    logs = {record["step"]: record for record in log_history if "loss" in record}
    total = len(ends_s)
    steps = range(warmup_steps + 1, total + 1)
    lengths = [n for batch in batches[warmup_steps * batches_per_step: total * batches_per_step] for n in batch]
    return Measured(
        losses=[logs[step]["loss"] for step in steps if step in logs],
        grad_norms=[float(logs[step].get("grad_norm", math.nan)) for step in steps if step in logs],
        seconds=ends_s[-1] - ends_s[warmup_steps - 1] if warmup_steps else ends_s[-1] - ends_s[0],
        real_tokens=sum(lengths),
        flops=sum(sample_flops(shape, method, n) for n in lengths),
    )
