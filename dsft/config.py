"""The typed run config: one YAML file with sections model, data, method, train, eval, output.

Every field has a docstring (shown by `dsft config show --docs`); unknown keys are errors.
`load_config` reads the YAML, applies `--set key.path=value` overrides, replaces `${NAME}`
environment references and validates; every problem becomes a `DsftError` naming the key path,
the YAML line and what is allowed. `dump_config` writes the references back, never their values.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from dsft.errors import DsftError

PRESETS = ("tiny-deepseek-v3", "tiny-qwen2", "tiny-llama")

SECRET_KEYS = (("model", "hub_token"),)
"""Key paths of secrets: saved only as the ${NAME} reference the config wrote, else as null."""

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MISSING = object()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class ModelConfig(_Section):
    name_or_path: str | None = None
    """Hugging Face hub id or local directory of a causal LM in HF format; exclusive with preset."""
    preset: Literal["tiny-deepseek-v3", "tiny-qwen2", "tiny-llama"] | None = None
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
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """Attention kernel; default: transformers' choice (sdpa where supported)."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "ModelConfig":
        if (self.name_or_path is None) == (self.preset is None):
            raise ValueError("set exactly one of model.name_or_path (hub id or local dir) or model.preset")
        return self


class DataConfig(_Section):
    train_files: list[str] = Field(min_length=1)
    """Training data: jsonl, json, csv or parquet files, or a `datasets` save_to_disk directory."""
    validation_files: list[str] = []
    """Validation data in the same forms; exclusive with validation_ratio."""
    validation_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the training records held out for validation (seeded by train.seed)."""
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text"] = "auto"
    """Record format; auto detects it per file from the first record's keys."""
    chat_template: Literal["auto", "tokenizer", "deepseek_v3", "deepseek_r1"] = "auto"
    """Prompt rendering; auto: the tokenizer's own template, built-in deepseek_v3 when it has none."""
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

    _as_lists = field_validator("train_files", "validation_files", mode="before")(_as_list)

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataConfig":
        if self.validation_files and self.validation_ratio > 0:
            raise ValueError("set data.validation_files or data.validation_ratio, not both")
        return self


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input; must be 0 when LoRA reaches fused MoE expert weights (DeepSeek MoE)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj, gate_proj,
    up_proj, down_proj) or all-linear."""
    modules_to_save: list[str] = []
    """Modules trained in full and saved beside the adapter (e.g. lm_head, embed_tokens)."""


class FreezeConfig(_Section):
    trainable_layers: int = Field(2, ge=0)
    """Number of top decoder layers to train; the rest stay frozen."""
    train_embeddings: bool = False
    """Also train the input embeddings."""


class MethodConfig(_Section):
    type: Literal["full", "lora", "freeze"] = "lora"
    """full: every weight; lora: PEFT LoRA adapter; freeze: only the top layers and the head."""
    lora: LoraConfig = LoraConfig()
    """Settings for type lora."""
    freeze: FreezeConfig = FreezeConfig()
    """Settings for type freeze."""

    @model_validator(mode="after")
    def _settings_match_type(self) -> "MethodConfig":
        for other in ("lora", "freeze"):
            if other in self.model_fields_set and self.type != other:
                raise ValueError(f"method.{other} is set but method.type is {self.type!r}")
        return self


class TrainConfig(_Section):
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate of AdamW."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Total optimizer steps; overrides epochs."""
    batch_size: int = Field(4, ge=1)
    """Sequences per device per forward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    """Forward passes accumulated into one optimizer step."""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup; exclusive with lr_warmup_ratio."""
    lr_warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of all steps used for warmup."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW decoupled weight decay."""
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """AdamW beta1."""
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    """AdamW beta2."""
    max_grad_norm: float = Field(1.0, ge=0.0)
    """Gradient clipping by global L2 norm; 0 turns clipping off."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision; auto: bf16 on CUDA that supports it, else none."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 42
    """Seed of weights init, data order, dropout and the validation split."""
    logging_steps: int = Field(10, ge=1)
    """Optimizer steps between log lines (metrics.jsonl, TensorBoard, progress)."""
    eval_steps: int | None = Field(None, ge=1)
    """Optimizer steps between validation passes; default: once at the end."""
    save_steps: int | None = Field(None, ge=1)
    """Optimizer steps between checkpoints (for --resume); default: no intermediate checkpoints."""
    keep_last_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk; older ones are deleted."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without a better validation loss (needs eval_steps)."""
    tensorboard: bool = True
    """Write TensorBoard event files under the run directory."""
    packing: bool = False
    """Padding-free packing: samples grouped best-fit into rows of pack_tokens, attention kept within each sample."""
    pack_tokens: int | None = Field(None, ge=8)
    """Token budget of one packed row; default batch_size x data.max_length_tokens (a row replaces a padded batch)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient: stop before the optimizer applies it, or skip that step (counted)."""
    max_consecutive_nonfinite: int = Field(3, ge=1)
    """With nonfinite: skip, stop after this many non-finite steps in a row."""
    auto_find_batch_size: bool = False
    """On CUDA out-of-memory, halve batch_size and retry (the effective batch shrinks with it)."""

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.lr_warmup_steps and self.lr_warmup_ratio:
            raise ValueError("set train.lr_warmup_steps or train.lr_warmup_ratio, not both")
        if self.early_stopping_patience is not None:
            if self.eval_steps is None:
                raise ValueError("train.early_stopping_patience needs train.eval_steps")
            if self.save_steps is not None and self.save_steps % self.eval_steps:
                raise ValueError("with early stopping, train.save_steps must be a multiple of train.eval_steps")
        return self


class CheckConfig(_Section):
    name: str = Field(min_length=1)
    """Metric name in reports."""
    regex: str | None = None
    """The answer passes when this regular expression matches somewhere in it (Python re.search)."""
    python: str | None = None
    """A function "module:function" or "path/to/file.py:function", called as f(answer, reference, prompt) -> bool | float."""

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> "CheckConfig":
        if (self.regex is None) == (self.python is None):
            raise ValueError("a check needs exactly one of regex or python")
        return self


class EvalConfig(_Section):
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

    _as_lists = field_validator("generate_files", mode="before")(_as_list)


class ClassifyConfig(_Section):
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


class OutputConfig(_Section):
    dir: str = "runs/dsft-run"
    """Run directory: model or adapter, tokenizer, config.yaml, metrics.jsonl, summary.json, checkpoints/."""
    overwrite: bool = False
    """Replace an existing run directory instead of stopping with an error."""


class RunConfig(_Section):
    stage: Literal["sft"] = "sft"
    """Training stage: sft (supervised fine-tuning)."""
    task: Literal["causal_lm", "classification"] = "causal_lm"
    """What the model learns: causal_lm (SFT on text) or classification (a label per text, with a classification head)."""
    model: ModelConfig
    """The model to fine-tune."""
    data: DataConfig
    """Training and validation data."""
    method: MethodConfig = MethodConfig()
    """Which weights train: full, lora or freeze."""
    train: TrainConfig = TrainConfig()
    """Optimizer, schedule, precision, logging and checkpoints."""
    eval: EvalConfig = EvalConfig()
    """Evaluation around training."""
    output: OutputConfig = OutputConfig()
    """Where the run is written."""
    classify: ClassifyConfig = ClassifyConfig()
    """Settings for task classification: fields, loss, class weights, head only."""

    @model_validator(mode="after")
    def _packs_hold_a_sample(self) -> "RunConfig":
        if self.train.pack_tokens is not None and self.train.pack_tokens < self.data.max_length_tokens:
            raise ValueError("train.pack_tokens must be at least data.max_length_tokens, or a sample could fit no row")
        return self

    @model_validator(mode="after")
    def _classify_settings_match_task(self) -> "RunConfig":
        if self.task != "classification":
            if "classify" in self.model_fields_set:
                raise ValueError(f"classify is set but task is {self.task!r}; set task: classification")
            return self
        if self.train.packing:
            raise ValueError("train.packing does not apply to task classification (one label per sequence)")
        if self.classify.head_only and self.method.type != "full":
            raise ValueError(f"classify.head_only needs method.type full (got {self.method.type!r}): it freezes the backbone itself")
        return self

    # Key path -> (the text the config wrote, e.g. "${DATA}/train.jsonl"; the value it validated to):
    # dump_config writes the text back where the value is unchanged, so no variable's value is saved.
    _env_references: dict[tuple, tuple[str, Any]] = PrivateAttr(default_factory=dict)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config; raises DsftError naming the key and the file line."""
    path = Path(path)
    text = _read_text(path)
    raw = _parse_yaml(text, path)
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw, source=str(path), yaml_text=text)


def validate_config(raw: dict, source: str = "config", yaml_text: str | None = None) -> RunConfig:
    """Replace ${NAME} references from the environment and validate; raises DsftError listing every problem.

    The config remembers where the references were, so dump_config writes them back.
    """
    expanded, references, problems = expand_env_references(raw)
    if problems:
        raise _invalid(source, [f"{_where(path, yaml_text)}: {problem}" for path, problem in problems])
    try:
        config = RunConfig.model_validate(expanded)
    except ValidationError as exc:
        raise _invalid(source, [_describe(err, yaml_text) for err in exc.errors()]) from None
    dumped = config.model_dump(mode="json")
    config._env_references = {path: (text, _lookup(dumped, path)) for path, text in references.items()}
    for path in SECRET_KEYS:
        if _lookup(dumped, path) not in (None, _MISSING) and path not in references:
            _warn_literal_secret(source, ".".join(path))
    return config


def _invalid(source: str, lines: list[str]) -> DsftError:
    return DsftError(f"invalid config {source}:\n" + "\n".join(f"  - {line}" for line in lines))


def _warn_literal_secret(source: str, key: str) -> None:
    # A warning, not an error: the token works, but a config file gets copied and shared.
    message = (f"{source}: {key} holds a literal secret; write an environment reference such as "
               "${HF_TOKEN} so the file holds none (the value itself is never saved)")
    warnings.warn(message, UserWarning, stacklevel=3)


def expand_env_references(raw: Any) -> tuple[Any, dict[tuple, str], list[tuple[tuple, str]]]:
    """Replace ${NAME} and ${NAME:-default} in every string of raw by the environment's values.

    Returns the expanded copy, key path -> original text of each string that had a reference, and
    (key path, problem) for each malformed reference and each variable that is not set and has no default.
    As in the shell, a default also replaces a variable that is set but empty.
    """
    references: dict[tuple, str] = {}
    problems: list[tuple[tuple, str]] = []

    def walk(node: Any, path: tuple) -> Any:
        if isinstance(node, dict):
            return {key: walk(value, (*path, key)) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value, (*path, i)) for i, value in enumerate(node)]
        if not (isinstance(node, str) and "${" in node):
            return node
        references[path] = node
        try:
            return _expand(node)
        except ValueError as exc:
            problems.append((path, str(exc)))
            return node

    return walk(raw, ()), references, problems


def _expand(text: str) -> str:
    if "${" in _ENV_REFERENCE.sub("", text):
        raise ValueError("malformed environment reference; write ${NAME} or ${NAME:-default} (NAME: letters, digits, _)")

    def value_of(match: re.Match) -> str:
        name, default = match.groups()
        value = os.environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise ValueError(f"environment variable {name} is not set; set it, or write ${{{name}:-default}}")
        return value

    return _ENV_REFERENCE.sub(value_of, text)


def apply_override(raw: dict, override: str) -> None:
    """Apply one `key.path=value` override in place; the value is parsed as YAML (1e-4, true, [a, b])."""
    key, sep, value_text = override.partition("=")
    if not sep or not key.strip():
        raise DsftError(f"--set {override!r}: expected key.path=value, e.g. train.learning_rate=1e-4")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise DsftError(f"--set {override!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value_text


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML, every default filled in (what `dsft config show` prints).

    Only the settings of the method in use are written: those of the others do not apply, and
    writing them would make the file invalid to load back. A value that came from a ${NAME}
    reference is written as that reference unless it was changed since; a secret (SECRET_KEYS)
    is written only as its reference, or as null.
    """
    raw = config.model_dump(mode="json")
    for other in ("lora", "freeze"):
        if other != config.method.type:
            del raw["method"][other]
    if config.task != "classification":
        del raw["classify"]
    for path in SECRET_KEYS:
        _assign(raw, path, None)
    for path, (text, loaded_value) in config._env_references.items():
        current = _lookup(raw, path)
        if current is not _MISSING and (current == loaded_value or path in SECRET_KEYS):
            _assign(raw, path, text)
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def _lookup(node: Any, path: tuple) -> Any:
    """The value at a key path (dict keys and list indexes) of a dumped config, or _MISSING."""
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return _MISSING
    return node


def _assign(node: Any, path: tuple, value: Any) -> None:
    """Set the value at a key path that _lookup finds."""
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DsftError(f"config file not found: {path}")
    return path.read_text(encoding="utf-8")


def _parse_yaml(text: str, path: Path) -> dict:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise DsftError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DsftError(f"{path}: the config must be a mapping with sections model, data, method, train, eval, output")
    return raw


def _describe(err: dict, yaml_text: str | None, root: type[BaseModel] | None = None) -> str:
    where = _where(err["loc"], yaml_text)
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(err["loc"][:-1], root or RunConfig))
        return f"{where}: unknown key; allowed here: {allowed}"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    value = err.get("input")
    # A whole section (for a check across its keys) or a secret is not echoed: it may hold a token.
    if isinstance(value, dict) or tuple(map(str, err["loc"])) in SECRET_KEYS:
        return f"{where}: {err['msg']}"
    return f"{where}: {err['msg']} (got {value!r})"


def _where(loc: tuple, yaml_text: str | None) -> str:
    """The key path of loc, with its YAML line where the text has it: "train.seed (line 7)"."""
    parts = [str(part) for part in loc]
    key = ".".join(parts) or "(top level)"
    line = _yaml_line(yaml_text, parts)
    return f"{key} (line {line})" if line else key


def _allowed_keys(parent_loc: tuple, root: type[BaseModel]) -> list[str]:
    model = root
    for part in parent_loc:
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _yaml_line(yaml_text: str | None, loc: list[str]) -> int | None:
    """1-based line of the deepest key of loc that exists in the YAML text, if any."""
    if not yaml_text:
        return None
    try:
        node = yaml.compose(yaml_text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == part), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def load_yaml_model(path: str | Path, model: type[BaseModel], overrides=()) -> BaseModel:
    """Read a YAML file into another typed config (e.g. data preparation), with the run config's rules:
    --set overrides, ${NAME} references, errors naming the key path and line. Raises DsftError."""
    path = Path(path)
    text = _read_text(path)
    raw = _parse_yaml(text, path)
    for override in overrides:
        apply_override(raw, override)
    expanded, _, problems = expand_env_references(raw)
    if problems:
        raise _invalid(str(path), [f"{_where(loc, text)}: {problem}" for loc, problem in problems])
    try:
        return model.model_validate(expanded)
    except ValidationError as exc:
        raise _invalid(str(path), [_describe(err, text, model) for err in exc.errors()]) from None


def validate_files(paths) -> bool:
    """Validate each config file, printing ok or its problems; True when all are valid."""
    all_valid = True
    for path in paths:
        try:
            load_config(path)
            print(f"ok       {path}")
        except DsftError as exc:
            all_valid = False
            print(f"invalid  {exc}")
    return all_valid
