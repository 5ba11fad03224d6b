"""Settings of `dsft compress` (dsft/compress): the method, its strength, calibration and the accuracy bound;
`--set compress.key=value` on the command line."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section

METHODS = ("prune-magnitude", "prune-layers")


class CompressConfig(Section):
    method: Literal["prune-magnitude", "prune-layers"]
    """prune-magnitude: zero the smallest weights of every linear layer of the decoder (unstructured); prune-layers:
    drop the decoder layers that change their input least on the calibration data (block influence)."""
    sparsity: float = Field(0.5, gt=0, lt=1)
    """prune-magnitude: share of each decoder linear layer's weights set to zero."""
    drop_layers: int = Field(1, ge=1)
    """prune-layers: decoder layers removed."""
    calibration_samples: int = Field(64, ge=1)
    """Records of the calibration data rendered and run through the model (prune-layers)."""
    calibration_max_tokens: int = Field(512, ge=8)
    """Longest calibration sequence, tokens (longer ones are cut)."""
    max_drop_percent: float | None = Field(None, ge=0, le=100)
    """With --eval: fail (exit 1) when any metric of the compressed model drops more than this, percent of the
    uncompressed model's value; none: report only."""
