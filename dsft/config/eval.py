"""Config section eval: evaluation around training and by dsft eval (metrics, checks, intervals, speed)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dsft.config.base import Section, as_list
from dsft.config.loader import apply_override
from dsft.errors import DsftError


class CheckConfig(Section):
    name: str = Field(min_length=1)
    """Metric name in reports."""
    regex: str | None = None
    """The answer passes when this regular expression matches somewhere in it (Python re.search)."""
    python: str | None = None
    """A function "module:function" or "path/to/file.py:function", called as f(answer, reference, prompt) -> bool | float."""

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> CheckConfig:
        if (self.regex is None) == (self.python is None):
            raise ValueError("a check needs exactly one of regex or python")
        return self


class EvalConfig(Section):
    generate_files: list[str] = []
    """Held-out prompts with answers (any format): exact match before and after training, eval metrics at each eval step."""
    before_training: bool = True
    """Also score the model before training, to show what fine-tuning changed."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest generated answer in tokens."""
    batch_size: int = Field(16, ge=1)
    """Prompts per generation batch."""
    max_samples: int | None = Field(None, ge=1)
    """Score at most this many prompts."""
    task: Literal["generation", "classification"] = "generation"
    """classification: the reference answers are labels; adds accuracy, macro/micro F1, per-class scores and a confusion matrix."""
    metrics: list[Literal["exact_match", "f1", "bleu", "chrf", "rouge", "perplexity"]] = [
        "exact_match", "f1", "bleu", "chrf", "rouge", "perplexity"]
    """Metrics of dsft eval (and of generate_files during training); semantic similarity and checks come on top."""
    bleu_tokenize: Literal["auto", "13a", "zh", "intl", "char"] = "auto"
    """sacrebleu tokenizer; auto: zh when the references are mostly Chinese, else 13a."""
    rouge_tokenization: Literal["auto", "char", "word"] = "auto"
    """ROUGE units; auto: characters when the references are mostly Chinese, else words."""
    embedding_model: str | None = None
    """Local path of a sentence-embedding model (HF format) for a semantic-similarity score; none: skipped."""
    checks: list[CheckConfig] = []
    """Custom pass/fail metrics on each answer: a regex that must match, or a Python function."""
    bootstrap_resamples: int = Field(1000, ge=0)
    """Resamples for the confidence intervals of the headline metrics; 0 turns them off."""
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    """Confidence level of the bootstrap intervals."""
    seed: int = 0
    """Seed of sampling (if enabled) and of the bootstrap, so a rerun gives the same numbers."""
    speed_batch_size: int = Field(8, ge=2)
    """The larger batch of the speed measurement (the other is batch 1)."""
    speed_new_tokens: int = Field(32, ge=2)
    """Tokens generated per prompt when measuring speed."""
    examples_listed: int = Field(10, ge=0)
    """Examples listed as won and as lost in a side-by-side comparison."""

    _as_lists = field_validator("generate_files", mode="before")(as_list)


def eval_settings(base: EvalConfig, overrides) -> EvalConfig:
    """base with `eval.key=value` overrides applied; raises DsftError naming a bad key or value."""
    from pydantic import ValidationError

    raw = {"eval": base.model_dump(mode="json")}
    for override in overrides:
        if not override.startswith("eval."):
            raise DsftError(f"--set {override!r}: dsft eval takes eval.* settings only")
        apply_override(raw, override)
    try:
        return EvalConfig.model_validate(raw["eval"])
    except ValidationError as exc:
        problems = "; ".join(f"eval.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise DsftError(f"invalid --set: {problems}") from None
