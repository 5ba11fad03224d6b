"""Settings of `dsft compress` (dsft/compress): the method, its strength, calibration and the accuracy bound;
`--set compress.key=value` on the command line."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section


class CompressConfig(Section):
    method: Literal["int8-dynamic", "int8-weight", "int4-weight", "prune-magnitude", "prune-layers", "prune-experts"]
    """int8-dynamic: int8 weights and activations quantized per token at run time (torchao, CPU serving);
    int8-weight, int4-weight: weight-only quantization (torchao; int4 in groups of group_size); prune-magnitude: zero
    the smallest weights of every decoder linear layer (unstructured); prune-layers: drop the decoder layers that
    change their input least on the calibration data (block influence); prune-experts (MoE models): drop the
    routed experts each layer's router used least on the calibration data."""
    group_size: int = Field(32, ge=8)
    """int4-weight: weights sharing one scale (a divisor of every quantized layer's input width)."""
    sparsity: float = Field(0.5, gt=0, lt=1)
    """prune-magnitude: share of each decoder linear layer's weights set to zero."""
    drop_layers: int = Field(1, ge=1)
    """prune-layers: decoder layers removed."""
    drop_experts: int = Field(1, ge=1)
    """prune-experts: routed experts removed from every MoE layer."""
    calibration_samples: int = Field(64, ge=1)
    """Records of the calibration data rendered and run through the model (prune-layers, prune-experts)."""
    calibration_max_tokens: int = Field(512, ge=8)
    """Longest calibration sequence, tokens (longer ones are cut)."""
    max_drop_percent: float | None = Field(None, ge=0, le=100)
    """With --eval: fail (exit 1) when any metric of the compressed model drops more than this, percent of the
    uncompressed model's value; none: report only."""
