"""Typed config of `dsft data prepare`: the steps, the split and the outputs.

`steps` run in the order given on every record; `train_steps` (balance, augment) run on the
training split only, after splitting, so augmented or resampled records never reach validation
or test. Each step is named by its `step` key; an unknown name is an error listing the allowed ones.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from dsft.config.base import Section, as_list
from dsft.config.columns import RecordField, TagsConfig, check_columns, refuse_foreign_columns

PII_KINDS = ("email", "phone", "cn_id", "bank_card", "ip")


class CleanStep(Section):
    step: Literal["clean"]
    """Text cleanup of every text field."""
    nfkc: bool = True
    """Unicode NFKC normalization (also turns full-width Latin letters and digits into half-width)."""
    whitespace: bool = True
    """Collapse runs of spaces and tabs, trim each line, at most one empty line in a row."""
    control_chars: bool = True
    """Remove control and zero-width characters (newlines and tabs stay)."""
    strip_html: bool = False
    """Remove HTML tags and unescape entities (&amp; -> &)."""
    fullwidth_punctuation: Literal["keep", "to_halfwidth", "to_fullwidth"] = "keep"
    """Chinese punctuation style: keep, or convert ，。！？：；（） to ,.!?:;() or the other way."""
    remove_latin: bool = False
    """Remove Latin letters (some Chinese-only tasks want this)."""
    remove_digits: bool = False
    """Remove digits 0-9."""


class LengthFilterStep(Section):
    step: Literal["filter_length"]
    """Drop records whose token count (all text fields, the configured tokenizer) is out of bounds."""
    min_tokens: int = Field(1, ge=0)
    """Fewest tokens a record may have."""
    max_tokens: int | None = Field(None, ge=1)
    """Most tokens a record may have; none: no upper bound."""


class LanguageFilterStep(Section):
    step: Literal["filter_language"]
    """Keep records written in the given languages, by script: zh (Han characters) or en (Latin letters)."""
    languages: list[Literal["zh", "en"]] = Field(min_length=1)
    """Languages to keep."""
    min_share: float = Field(0.5, gt=0.0, le=1.0)
    """Share of the letters that must be in a kept language's script."""


class QualityFilterStep(Section):
    step: Literal["filter_quality"]
    """Heuristic quality filter."""
    max_repetition_ratio: float = Field(0.3, gt=0.0, le=1.0)
    """Most allowed share of repeated word/character 3-grams."""
    max_symbol_ratio: float = Field(0.3, gt=0.0, le=1.0)
    """Most allowed share of characters that are neither letters, digits, CJK nor whitespace."""
    min_answer_chars: int = Field(1, ge=0)
    """Fewest characters an answer (output / final assistant turn) may have."""


class ClassifierFilterStep(Section):
    step: Literal["filter_classifier"]
    """Drop records a user quality classifier scores low."""
    function: str
    """"module:function" or "path/to/file.py:function", called as f(record: dict) -> float in [0, 1]."""
    min_score: float = Field(0.5, ge=0.0, le=1.0)
    """Records scoring below this are dropped."""


class DedupStep(Section):
    step: Literal["dedup"]
    """Remove duplicates, keeping the first record of each cluster."""
    exact: bool = True
    """Remove records whose normalized text (NFKC, case-folded, whitespace collapsed) was seen before."""
    near: bool = True
    """Remove near-duplicates found with MinHash LSH (datasketch)."""
    threshold: float = Field(0.8, gt=0.0, lt=1.0)
    """Estimated Jaccard similarity of character shingles above which records are near-duplicates."""
    num_perm: int = Field(128, ge=16)
    """MinHash permutations (more: more exact, slower)."""
    shingle_chars: int = Field(5, ge=1)
    """Length of the character shingles."""


class PiiStep(Section):
    step: Literal["pii"]
    """Mask or hash personal data in every text field."""
    kinds: list[Literal["email", "phone", "cn_id", "bank_card", "ip"]] = list(PII_KINDS)
    """Kinds of PII to find."""
    action: Literal["mask", "hash"] = "mask"
    """mask: replace by [EMAIL], [PHONE], ...; hash: by a salted hash, so equal values stay equal."""
    id_fields: list[str] = []
    """Top-level record fields holding user ids, replaced by their salted hash."""
    salt: str | None = None
    """Salt of the hashes; write ${DSFT_PII_SALT} so it is never saved. Required for hash and id_fields."""

    @model_validator(mode="after")
    def _salt_when_hashing(self) -> PiiStep:
        if (self.action == "hash" or self.id_fields) and not self.salt:
            raise ValueError("pii.salt is required to hash values or id_fields (write ${DSFT_PII_SALT})")
        return self


class ChunkStep(Section):
    step: Literal["chunk"]
    """Split long text records into overlapping windows of tokens (text format only)."""
    max_tokens: int = Field(ge=8)
    """Tokens per window at most."""
    stride_tokens: int = Field(ge=1)
    """Tokens the window moves each time (stride < max_tokens gives overlap)."""

    @model_validator(mode="after")
    def _stride_fits(self) -> ChunkStep:
        if self.stride_tokens > self.max_tokens:
            raise ValueError("chunk.stride_tokens must not exceed chunk.max_tokens (text would be skipped)")
        return self


class BalanceStep(Section):
    step: Literal["balance"]
    """Rebalance classes of the training split."""
    max_ratio: float = Field(3.0, ge=1.0)
    """Largest allowed count ratio of the most to the least frequent class (3.0 means 1:3 at worst)."""
    method: Literal["undersample", "oversample"] = "undersample"
    """undersample: drop records of large classes; oversample: repeat records of small classes."""


class AugmentStep(Section):
    step: Literal["augment"]
    """Add augmented copies of training records (marked "augmented": true)."""
    copies: int = Field(1, ge=1)
    """Augmented copies per record."""
    synonyms_file: str | None = None
    """JSON file {word: [synonyms]} for synonym replacement."""
    synonym_prob: float = Field(0.1, ge=0.0, le=1.0)
    """Chance each word with synonyms is replaced."""
    swap_count: int = Field(1, ge=0)
    """Random word swaps per text (EDA)."""
    delete_prob: float = Field(0.1, ge=0.0, lt=1.0)
    """Chance each word is deleted (EDA)."""
    back_translation: str | None = None
    """"module:function" or "file.py:function" called as f(text) -> text, e.g. a translation round trip."""
    fields: Literal["prompt", "all"] = "prompt"
    """Which texts to augment: prompts only (answers stay exact), or every text field."""


RecordStep = Annotated[
    CleanStep | LengthFilterStep | LanguageFilterStep | QualityFilterStep | ClassifierFilterStep | DedupStep | PiiStep
    | ChunkStep,
    Field(discriminator="step"),
]
TrainStep = Annotated[BalanceStep | AugmentStep, Field(discriminator="step")]


class SplitConfig(Section):
    validation_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of records for validation."""
    test_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of records for test."""
    stratify_field: str | None = None
    """Top-level field holding a label: each split keeps the label proportions."""
    group_field: str | None = None
    """Top-level field (user, document, patient id): one group never lands in two splits."""
    seed: int = 0
    """Seed of the split and of the train steps."""
    contamination_ngram: int = Field(13, ge=3)
    """Word n-gram (characters for Chinese) size of the overlap check between test/validation and train."""
    drop_contaminated: bool = True
    """Remove validation and test records that overlap the training split."""

    @model_validator(mode="after")
    def _leave_training_data(self) -> SplitConfig:
        if self.validation_ratio + self.test_ratio >= 1.0:
            raise ValueError("split.validation_ratio + split.test_ratio must leave records for training")
        return self


class PrepareConfig(Section):
    inputs: list[str] = Field(min_length=1)
    """Raw data files (jsonl, json, csv, parquet, datasets dirs); never modified."""
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text"] = "auto"
    """Record format; auto detects it from the first record."""
    columns: dict[RecordField, str] = {}
    """Fields named otherwise in the inputs, as {dsft's field: the file's field}; the prepared files use dsft's."""
    tags: TagsConfig = TagsConfig()
    """Keys and role values inside conversation turns named otherwise (LLaMA-Factory's dataset_info tags)."""
    on_error: Literal["error", "skip"] = "error"
    """Bad records: error stops with file:line; skip drops and counts them."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id for token counts (length filter, chunking, histograms); none: counts characters."""
    label_field: str | None = None
    """Top-level field holding the class label, for balance reports and rebalancing."""
    steps: list[RecordStep] = []
    """Record steps, applied in order to every record."""
    train_steps: list[TrainStep] = []
    """Steps on the training split only, after splitting: balance, augment."""
    split: SplitConfig = SplitConfig()
    """Train / validation / test split."""
    output_dir: str = "data/prepared"
    """Where train.jsonl, validation.jsonl, test.jsonl, their .sha256 fingerprints and the report go."""
    num_proc: int = Field(1, ge=1)
    """Processes for the record steps (datasets map)."""
    chunk_records: int = Field(10_000, ge=1)
    """Records held in memory at a time while streaming."""

    _as_lists = field_validator("inputs", mode="before")(as_list)
    _foreign_columns = field_validator("columns", mode="before")(refuse_foreign_columns)
    _columns = field_validator("columns")(check_columns)
