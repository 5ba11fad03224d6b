"""Config section gate: the regression gate `dsft gate` runs on a candidate against a baseline (dsft/lifecycle)."""

from __future__ import annotations

from pydantic import Field, field_validator

from dsft.config.base import Section, as_list


class GateConfig(Section):
    against: str | None = None
    """The baseline: a run directory, a model directory, or registry:NAME@production; `dsft gate --against`
    replaces it."""
    data: str | None = None
    """Test data (any dsft format, with reference answers) both models are scored on; --data replaces it."""
    metrics: list[str] = Field(default_factory=lambda: ["exact_match"])
    """Metrics that must hold: exact_match, f1, bleu, chrf, rouge1, rouge2, rougeL, rougeLsum, perplexity,
    semantic_similarity or an eval.checks name; --metrics replaces the list."""
    max_drop_percent: float = Field(5.0, ge=0, le=100)
    """Largest drop of a metric allowed, percent of the baseline's value (relative; perplexity: its rise)."""
    require_significance: bool = False
    """Fail on a drop beyond the bound only when the paired bootstrap interval of the change lies wholly below
    zero; off: every drop beyond the bound fails, one inside the noise said to be so."""
    resamples: int = Field(1000, ge=100)
    """Paired bootstrap resamples of the change of each metric."""
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    """Confidence level of those intervals."""

    _as_lists = field_validator("metrics", mode="before")(as_list)
