"""The regression gate's judgement, pure numbers: the relative change of each metric with its paired bootstrap
interval, the verdict against the bound, and the check cases a candidate newly fails."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dsft.eval.text_metrics import resample_indices

LOWER_IS_BETTER = frozenset({"perplexity"})
MEAN_OF_EXAMPLES = frozenset({"exact_match", "f1", "rouge1", "rouge2", "rougeL", "rougeLsum", "semantic_similarity"})
"""Metrics whose corpus value is the mean of the per-example scores, so a paired resample of examples gives the
interval of their change; checks are such means too. BLEU and chrF are corpus statistics, perplexity is per token:
the gate compares their headline values without an interval."""


@dataclass(frozen=True)
class MetricVerdict:
    name: str
    baseline: float
    candidate: float
    drop_percent: float
    """How much worse the candidate is, percent of the baseline (negative: better)."""
    interval_percent: tuple[float, float] | None
    """Paired bootstrap interval of the candidate's relative change, percent (None: no per-example scores)."""
    passed: bool
    why: str

    def as_dict(self) -> dict:
        return asdict(self)


def relative_drop_percent(name: str, baseline: float, candidate: float) -> float:
    """Percent by which candidate is worse than baseline (a rise for perplexity), relative to the baseline's value;
    a zero baseline gives the absolute difference in percentage points."""
    worse_by = candidate - baseline if name in LOWER_IS_BETTER else baseline - candidate
    return 100.0 * worse_by / abs(baseline) if baseline else 100.0 * worse_by


def paired_change_interval(baseline: Sequence[float], candidate: Sequence[float], resamples: int, seed: int,
                           confidence: float) -> tuple[float, float] | None:
    """Percentile interval of (mean candidate - mean baseline) / mean baseline, percent, over resamples of the
    examples both scored (the same examples for both models in each resample); None with fewer than 2."""
    pairs = np.array([(b, c) for b, c in zip(baseline, candidate) if b is not None and c is not None], dtype=float)
    if len(pairs) < 2:
        return None
    full_baseline = float(pairs[:, 0].mean())
    changes = []
    for indices in resample_indices(len(pairs), resamples, seed):
        base, cand = pairs[indices, 0].mean(), pairs[indices, 1].mean()
        scale = abs(base) if base else (abs(full_baseline) or 1.0)
        changes.append(100.0 * (cand - base) / scale)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(changes, tail)), float(np.percentile(changes, 100 - tail))


def judge(name: str, baseline: float, candidate: float, interval: tuple[float, float] | None,
          max_drop_percent: float, require_significance: bool) -> MetricVerdict:
    """Pass unless the drop is beyond the bound; a drop beyond it whose interval reaches zero or above is inside
    the noise: reported so, and passed only under require_significance."""
    drop = relative_drop_percent(name, baseline, candidate)
    if name in LOWER_IS_BETTER and interval is not None:
        interval = (-interval[1], -interval[0])  # a rise is a drop of quality
    verdict = {"name": name, "baseline": baseline, "candidate": candidate, "drop_percent": drop,
               "interval_percent": interval}
    if drop <= max_drop_percent:
        return MetricVerdict(**verdict, passed=True, why=f"{_change(drop)}, within the {max_drop_percent:g}% bound")
    if interval is None:
        return MetricVerdict(**verdict, passed=False,
                             why=f"dropped {drop:.2f}% (> {max_drop_percent:g}%); no per-example interval for {name}")
    low, high = interval
    span = f"interval of the change [{low:+.2f}%, {high:+.2f}%]"
    if high < 0:
        return MetricVerdict(**verdict, passed=False,
                             why=f"dropped {drop:.2f}% (> {max_drop_percent:g}%), a real drop: {span} lies below 0")
    if require_significance:
        return MetricVerdict(**verdict, passed=True, why=f"dropped {drop:.2f}% but inside the noise ({span} reaches "
                                                         "0); not counted under require_significance")
    return MetricVerdict(**verdict, passed=False, why=f"dropped {drop:.2f}% (> {max_drop_percent:g}%), inside the "
                                                      f"noise ({span} reaches 0); require_significance would pass it")


def _change(drop: float) -> str:
    return f"dropped {drop:.2f}%" if drop > 0 else f"gained {-drop:.2f}%" if drop < 0 else "unchanged"


def check_regressions(baseline: Sequence[float | None], candidate: Sequence[float | None]) -> list[int]:
    """Indices of the cases the candidate scores lower on than the baseline (a pass turned into a failure)."""
    return [i for i, (b, c) in enumerate(zip(baseline, candidate)) if b is not None and c is not None and c < b]
