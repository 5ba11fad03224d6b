"""Config sections model and data: which model, which data (the method section: method.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from dsft.config.base import Section, as_list
from dsft.config.columns import RecordField, TagsConfig, check_columns, refuse_foreign_columns


class ModelConfig(Section):
    name_or_path: str | None = None
    """Hugging Face hub id or local directory of a causal LM in HF format; exclusive with preset."""
    preset: Literal["tiny-deepseek-v3", "tiny-deepseek-v2", "tiny-deepseek-v32", "tiny-deepseek-v4", "tiny-qwen2",
                    "tiny-llama"] | None = None
    """A tiny random-init model built from config, no download: for tests and the quickstart."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; default: the model's own (a preset trains one on the data)."""
    tokenizer_vocab_size: int = Field(1024, ge=300, le=200_000)
    """Vocabulary size (tokens) of the byte-level BPE tokenizer trained for a preset."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of name_or_path."""
    hub_token: SecretStr | None = None
    """Hugging Face token for private or gated repositories; write ${HF_TOKEN}, the value is never saved
    (a literal token works but is saved as null, and a warning asks for a reference)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; auto: bfloat16 where CUDA supports it, else float32."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model repository; off unless you trust its author."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "varlen"] | None = None
    """Attention kernel; default: transformers' choice (sdpa where supported), and for packed rows on CUDA the
    speed plan's (flash_attention_2 with flash-attn installed, else varlen). varlen: PyTorch's varlen flash kernel
    over packed sequences (CUDA, bf16/fp16; SDPA per sequence elsewhere)."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.preset is None):
            raise ValueError("set exactly one of model.name_or_path (hub id or local dir) or model.preset")
        return self


THINKING_MODES = {"auto": None, "on": True, "off": False}
"""data.thinking (and dsft generate/chat --thinking) as the renderers take it."""


class DataConfig(Section):
    train_files: list[str] = Field(min_length=1)
    """Training data: jsonl, json, csv or parquet files, or a `datasets` save_to_disk directory."""
    validation_files: list[str] = []
    """Validation data in the same forms; exclusive with validation_ratio."""
    validation_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the training records held out for validation (seeded by train.seed)."""
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text"] = "auto"
    """Record format; auto detects it per file from the first record's keys."""
    columns: dict[RecordField, str] = {}
    """Fields named otherwise in the files, as {dsft's field: the file's field} (output: answer); the other
    fields keep their names. A record holding both names of one field is refused."""
    tags: TagsConfig = TagsConfig()
    """Keys and role values inside conversation turns named otherwise (LLaMA-Factory's dataset_info tags)."""
    chat_template: Literal["auto", "tokenizer", "deepseek_v3", "deepseek_r1", "deepseek_r1_0528", "deepseek_v31"] = "auto"
    """Prompt rendering: a built-in DeepSeek template (token for token the model's own: deepseek_v3 for V3/V2.5,
    deepseek_r1 for R1 and R1-Distill, deepseek_r1_0528, deepseek_v31 for V3.1/V3.2 hybrid thinking), tokenizer
    (the tokenizer's own jinja template), or auto: the built-in one the tokenizer's template is, else that
    template, else deepseek_v3."""
    thinking: Literal["auto", "on", "off"] = "auto"
    """Thinking mode (deepseek_v31, or the variable thinking of a tokenizer template), the same in training,
    generate/chat, eval and serve: auto trains a record in thinking mode when its final turn has reasoning and
    generates without thinking (the template's default); a record's own thinking field (true/false) overrides it.
    deepseek_r1 and deepseek_r1_0528 always think and refuse off; deepseek_v3 refuses on."""
    reasoning: Literal["keep", "drop"] = "keep"
    """A final turn's reasoning: keep trains it (in thinking mode; a non-thinking record with reasoning is an
    error), drop trains the answer alone."""
    system_prompt: str | None = None
    """System message added to conversations that have none."""
    loss_on: Literal["assistant", "final_assistant", "all"] = "assistant"
    """Tokens that carry loss: every assistant turn, only the last one, or the whole sequence."""
    max_length_tokens: int = Field(2048, ge=8)
    """Longest training sequence in tokens; see truncation for longer ones."""
    truncation: Literal["right", "drop"] = "right"
    """Over-long sequences: right keeps the first max_length_tokens, drop skips the record (counted)."""
    on_error: Literal["error", "skip"] = "error"
    """Bad records: error stops with file:line and field; skip drops them and counts them in the log."""
    max_samples: int | None = Field(None, ge=1)
    """Use at most this many training records (first ones), for quick trials."""

    _as_lists = field_validator("train_files", "validation_files", mode="before")(as_list)
    _foreign_columns = field_validator("columns", mode="before")(refuse_foreign_columns)
    _columns = field_validator("columns")(check_columns)

    @property
    def thinking_mode(self) -> bool | None:
        """data.thinking as the renderers take it: True (on), False (off), None (auto)."""
        return THINKING_MODES[self.thinking]

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataConfig:
        if self.validation_files and self.validation_ratio > 0:
            raise ValueError("set data.validation_files or data.validation_ratio, not both")
        return self
