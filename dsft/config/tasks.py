"""Config sections of the head tasks: classify, token_classify and multitask (its heads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsft.config.base import Section


class ClassifyConfig(Section):
    text_field: str = Field("text", min_length=1)
    """Record field holding the text to classify."""
    label_field: str = Field("label", min_length=1)
    """Record field holding the label (a string or an integer)."""
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    """Training loss: cross entropy, or focal loss (down-weights examples the model already gets right)."""
    class_weights: Literal["none", "balanced"] = "none"
    """Per-class loss weights; balanced: n_samples / (n_classes x count of the class) over the training labels."""
    focal_gamma: float = Field(2.0, ge=0.0)
    """Focusing exponent of focal loss (with loss: focal); 0 gives cross entropy."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of the target probability spread evenly over all classes (0 <= x < 1)."""
    head_only: bool = False
    """Freeze the whole backbone and train only the classification head (needs method.type full)."""


class TokenClassifyConfig(Section):
    tokens_field: str = Field("tokens", min_length=1)
    """Record field holding the words (a list of strings; for Chinese, usually one character each)."""
    tags_field: str = Field("tags", min_length=1)
    """Record field holding one BIO tag per word: O, B-TYPE or I-TYPE."""
    word_separator: Literal["space", "none"] = "space"
    """How words join into the text the model reads: space (English) or none (Chinese)."""


class HeadConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    """Task name in logs and metrics, e.g. intent (letters, digits, _)."""
    kind: Literal["sequence", "token"]
    """sequence: one label per text; token: one BIO tag per word."""
    label_field: str = Field(min_length=1)
    """Record field with this task's label (kind sequence) or list of BIO tags (kind token); a record
    without it is unlabelled for this task and adds no loss to its head."""
    loss_weight: float = Field(1.0, gt=0)
    """Weight of this head's loss in the sum over heads."""


class MultitaskConfig(Section):
    heads: list[HeadConfig] = Field(default_factory=list)
    """The task heads on the shared backbone."""
    text_field: str = Field("text", min_length=1)
    """Record field holding the text, when no head is of kind token."""
    tokens_field: str = Field("tokens", min_length=1)
    """Record field holding the words, when a head is of kind token (sequence heads read them joined)."""
    word_separator: Literal["space", "none"] = "space"
    """How words join into text: space (English) or none (Chinese)."""

    @model_validator(mode="after")
    def _distinct_heads(self) -> MultitaskConfig:
        names = [head.name for head in self.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"multitask.heads names must be distinct (got {names})")
        return self
