"""The typed run config: one YAML file with sections model, data, method, train, eval, output.

Every field has a docstring (shown by `dsft config show --docs`); unknown keys are errors.
`load_config` reads the YAML, applies `--set key.path=value` overrides, replaces `${NAME}`
environment references and validates; every problem becomes a `DsftError` naming the key path,
the YAML line and what is allowed. `dump_config` writes the references back, never their values.
"""

from __future__ import annotations

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

from dsft.config_tasks import (  # noqa: F401  (re-exported)
    ClassifyConfig,
    DpoConfig,
    GrpoConfig,
    HeadConfig,
    MultitaskConfig,
    PpoConfig,
    RewardFunctionConfig,
    RewardModelConfig,
    SamplingConfig,
    TokenClassifyConfig,
)
from dsft.errors import DsftError
from dsft.yaml_config import (  # noqa: F401  (apply_override, expand_env_references, load_yaml_model: re-exported)
    MISSING,
    apply_override,
    assign,
    deep_merge,
    describe,
    expand_env_references,
    invalid,
    load_yaml_model,
    lookup,
    parse_yaml,
    read_text,
    where,
)

PRESETS = ("tiny-deepseek-v3", "tiny-qwen2", "tiny-llama")

SECRET_KEYS = (("model", "hub_token"),)
"""Key paths of secrets: saved only as the ${NAME} reference the config wrote, else as null."""



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class ModelConfig(_Section):
    name_or_path: str | None = None
    """Hugging Face hub id or local directory of a causal LM in HF format; exclusive with preset."""
    preset: Literal["tiny-deepseek-v3", "tiny-deepseek-v2", "tiny-qwen2", "tiny-llama"] | None = None
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
    def _one_validation_source(self) -> DataConfig:
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


class UnfreezeStep(_Section):
    step: int = Field(ge=0)
    """Optimizer step from which these layers train (0: from the start)."""
    layers: int | Literal["all"]
    """Top decoder layers that train from this step on, counted from the top; all: every layer and the embeddings."""


class MethodConfig(_Section):
    type: Literal["full", "lora", "freeze"] = "lora"
    """full: every weight; lora: PEFT LoRA adapter; freeze: only the top layers and the head."""
    lora: LoraConfig = LoraConfig()
    """Settings for type lora."""
    freeze: FreezeConfig = FreezeConfig()
    """Settings for type freeze."""
    unfreeze: list[UnfreezeStep] = []
    """Progressive unfreezing (types full and lora): the head (and final norm) trains from the start, each entry
    adds top decoder layers from its step on, e.g. [{step: 0, layers: 0}, {step: 100, layers: 4}, {step: 300, layers: all}]."""

    @model_validator(mode="after")
    def _settings_match_type(self) -> MethodConfig:
        for other in ("lora", "freeze"):
            if other in self.model_fields_set and self.type != other:
                raise ValueError(f"method.{other} is set but method.type is {self.type!r}")
        if self.unfreeze and self.type == "freeze":
            raise ValueError("method.unfreeze works with method.type full or lora; type freeze keeps a fixed set")
        steps = [entry.step for entry in self.unfreeze]
        layers = [float("inf") if entry.layers == "all" else entry.layers for entry in self.unfreeze]
        if steps != sorted(set(steps)) or layers != sorted(layers):
            raise ValueError("method.unfreeze entries must have increasing steps and non-decreasing layers")
        return self


class AdversarialConfig(_Section):
    method: Literal["none", "fgm", "pgd"] = "none"
    """Adversarial training on the input embeddings: fgm (one step along the gradient) or pgd (several projected steps)."""
    epsilon: float = Field(1.0, gt=0)
    """L2 norm of the embedding perturbation (fgm), or the radius it is projected into (pgd)."""
    pgd_steps: int = Field(3, ge=1)
    """Ascent steps of pgd."""
    pgd_alpha: float = Field(0.3, gt=0)
    """L2 norm of each pgd ascent step."""


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
    """Padding-free packing, attention kept within each sample. Stage sft on task causal_lm: samples grouped best-fit
    into rows of pack_tokens. Every other stage and task: each batch as it comes runs as one row of its real tokens
    (dpo: its chosen and rejected answers; the rest through the model body, whose outputs return to the padded layout)."""
    pack_tokens: int | None = Field(None, ge=8)
    """Token budget of one packed row (stage sft, task causal_lm); default batch_size x data.max_length_tokens."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient: stop before the optimizer applies it, or skip that step (counted)."""
    max_consecutive_nonfinite: int = Field(3, ge=1)
    """With nonfinite: skip, stop after this many non-finite steps in a row."""
    auto_find_batch_size: bool = False
    """On CUDA out-of-memory, halve batch_size and retry (the effective batch shrinks with it)."""
    adversarial: AdversarialConfig = AdversarialConfig()
    """Adversarial training (FGM/PGD on input embeddings), off by default."""
    liger: Literal["auto", "on", "off"] = "auto"
    """Liger Kernel's RMSNorm, RoPE and SwiGLU kernels; auto: on CUDA when liger-kernel is installed and the architecture
    is a dense one it covers (llama, mistral, qwen2, qwen3); off for DeepSeek V2/V3 (see dsft/models/kernels.py)."""
    chunked_loss: Literal["auto", "on", "off"] = "auto"
    """Causal-LM loss computed over chunks of tokens from the hidden states, never holding full-vocabulary logits;
    auto: on CUDA (on CPU the model's own loss)."""
    loss_chunk_tokens: int = Field(4096, ge=16)
    """Tokens per chunk of the chunked loss."""
    experts: Literal["auto", "eager", "grouped_mm", "batched_mm"] = "auto"
    """MoE expert kernel (transformers experts_implementation; grouped_mm also computes LoRA on the experts as grouped
    low-rank products); auto: grouped_mm where torch has a grouped GEMM for the device, else eager."""
    fused_optimizer: Literal["auto", "on", "off"] = "auto"
    """Fused AdamW (one kernel for all parameters; CUDA and CPU); auto: on."""
    compile: bool = False
    """torch.compile each decoder layer before training."""
    checkpointing: Literal["full", "selective", "offload"] = "full"
    """With gradient_checkpointing: full recomputes each layer; selective keeps attention outputs and recomputes the
    rest; offload is full with what the recompute needs held in pinned CPU memory (CUDA only; full on CPU)."""
    distributed: Literal["ddp", "zero2", "zero3", "zero3_offload", "fsdp2"] = "ddp"
    """How several processes (dsft train --nproc N) share the work: ddp replicates the model; zero2 shards optimizer
    states and gradients (DeepSpeed); zero3 also shards the weights; zero3_offload keeps optimizer states and weights
    in CPU memory; fsdp2 shards like zero3 with PyTorch FSDP2. One process: ignored. dsft plan estimates each."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
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
    def _exactly_one_kind(self) -> CheckConfig:
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


class OutputConfig(_Section):
    dir: str = "runs/dsft-run"
    """Run directory: model or adapter, tokenizer, config.yaml, metrics.jsonl, summary.json, checkpoints/."""
    overwrite: bool = False
    """Replace an existing run directory instead of stopping with an error."""


TASK_SECTIONS = {"classify": "classification", "token_classify": "token_classification", "multitask": "multitask"}
"""Config section of each head task, written only for its task."""
STAGE_SECTIONS = ("reward", "dpo", "grpo", "ppo")
"""Config sections named after their stage, written only for that stage."""


class RunConfig(_Section):
    stage: Literal["sft", "reward", "dpo", "grpo", "ppo"] = "sft"
    """Training stage: sft (supervised fine-tuning, or the head task), reward (a reward model on preference
    pairs), dpo (direct preference optimization), grpo (group relative policy optimization) or ppo."""
    task: Literal["causal_lm", "classification", "token_classification", "multitask"] = "causal_lm"
    """What the model learns: causal_lm (SFT on text), classification (a label per text), token_classification
    (a BIO tag per word, e.g. entities) or multitask (several heads on one backbone)."""
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
    token_classify: TokenClassifyConfig = TokenClassifyConfig()
    """Settings for task token_classification: word and tag fields."""
    multitask: MultitaskConfig = MultitaskConfig()
    """Settings for task multitask: the heads and the text fields."""
    reward: RewardModelConfig = RewardModelConfig()
    """Settings for stage reward."""
    dpo: DpoConfig = DpoConfig()
    """Settings for stage dpo."""
    grpo: GrpoConfig = GrpoConfig()
    """Settings for stage grpo: group size, sampling, KL, clipping, reward components."""
    ppo: PpoConfig = PpoConfig()
    """Settings for stage ppo: sampling, GAE, KL and entropy coefficients, clipping, reward components."""
    stages: list[dict[str, Any]] = []
    """Multi-stage run: stages trained in order, each a name plus sections that replace this config's
    (task, data, method, train, eval, classify, ...), each starting from the previous stage's weights."""

    @model_validator(mode="after")
    def _packing_settings_fit(self) -> RunConfig:
        if self.train.pack_tokens is not None and self.train.pack_tokens < self.data.max_length_tokens:
            raise ValueError("train.pack_tokens must be at least data.max_length_tokens, or a sample could fit no row")
        if self.train.packing and self.train.adversarial.method != "none":
            raise ValueError("train.adversarial sizes its perturbation per sequence, and under train.packing the "
                             "embeddings see one row per packed batch: use one of the two")
        return self

    @model_validator(mode="after")
    def _task_settings_match_task(self) -> RunConfig:
        for section, task in TASK_SECTIONS.items():
            if section in self.model_fields_set and self.task != task and not self.stages:
                raise ValueError(f"{section} is set but task is {self.task!r}; set task: {task}")
        for section in STAGE_SECTIONS:
            if section in self.model_fields_set and self.stage != section and not self.stages:
                raise ValueError(f"{section} is set but stage is {self.stage!r}; set stage: {section}")
        if self.stage != "sft" and self.task != "causal_lm":
            raise ValueError(f"stage {self.stage} trains a causal LM; task must be causal_lm (got {self.task!r})")
        if self.task == "multitask" and not self.multitask.heads:
            raise ValueError("task multitask needs multitask.heads")
        if self.task == "causal_lm":
            return self
        if self.train.pack_tokens is not None:
            raise ValueError(f"train.pack_tokens sizes the packed rows of task causal_lm; task {self.task} packs each "
                             "batch as it comes (train.batch_size sizes it): remove train.pack_tokens")
        if self.task != "classification":
            return self
        if self.classify.head_only and self.method.type != "full":
            raise ValueError(f"classify.head_only needs method.type full (got {self.method.type!r}): it freezes the backbone itself")
        return self

    # Key path -> (the text the config wrote, e.g. "${DATA}/train.jsonl"; the value it validated to):
    # dump_config writes the text back where the value is unchanged, so no variable's value is saved.
    _env_references: dict[tuple, tuple[str, Any]] = PrivateAttr(default_factory=dict)
    # The validated config of each entry of stages (this config with the stage's sections merged in).
    _stage_configs: list[RunConfig] = PrivateAttr(default_factory=list)

    @property
    def stage_configs(self) -> list[RunConfig]:
        """The run config of each stage, in order (empty for a single-stage run)."""
        return self._stage_configs


_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_STAGE_FIXED = ("model", "output", "stages")
"""Top-level sections a stage cannot set: the model is the previous stage's, the output dir is the run's."""


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config; raises DsftError naming the key and the file line."""
    path = Path(path)
    text = read_text(path)
    raw = parse_yaml(text, path)
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw, source=str(path), yaml_text=text)


def validate_config(raw: dict, source: str = "config", yaml_text: str | None = None) -> RunConfig:
    """Replace ${NAME} references from the environment and validate; raises DsftError listing every problem.

    The config remembers where the references were, so dump_config writes them back.
    """
    expanded, references, problems = expand_env_references(raw)
    if problems:
        raise invalid(source, [f"{where(path, yaml_text)}: {problem}" for path, problem in problems])
    try:
        config = RunConfig.model_validate(expanded)
    except ValidationError as exc:
        raise invalid(source, [describe(err, yaml_text, RunConfig, SECRET_KEYS) for err in exc.errors()]) from None
    config._stage_configs = _validate_stages(expanded, source, yaml_text)
    dumped = config.model_dump(mode="json")
    config._env_references = {path: (text, lookup(dumped, path)) for path, text in references.items()}
    for path in SECRET_KEYS:
        if lookup(dumped, path) not in (None, MISSING) and path not in references:
            _warn_literal_secret(source, ".".join(path))
    return config


def _validate_stages(expanded: dict, source: str, yaml_text: str | None) -> list[RunConfig]:
    """Each stage's config: the top-level config with the stage's sections merged in, validated;
    errors name stages.N.key and its line."""
    base = {key: value for key, value in expanded.items() if key != "stages"}
    configs, problems, names = [], [], set()
    for i, stage in enumerate(expanded.get("stages") or []):
        stage = dict(stage)
        name = stage.pop("name", None)
        fixed = [key for key in _STAGE_FIXED if key in stage]
        if not isinstance(name, str) or not _STAGE_NAME.match(name) or name in names:
            problems.append(f"{where(('stages', i, 'name'), yaml_text)}: each stage needs a distinct name of letters, "
                            f"digits, _ and - (got {name!r})")
        elif fixed:
            problems.append(f"{where(('stages', i, fixed[0]), yaml_text)}: a stage cannot set {fixed[0]}; the first stage "
                            "starts from the top-level model, each later one from the stage before, under output.dir")
        names.add(name)
        try:
            configs.append(RunConfig.model_validate(deep_merge(base, stage)))
        except ValidationError as exc:
            problems += [describe(err, yaml_text, RunConfig, SECRET_KEYS, ("stages", i)) for err in exc.errors()]
    if problems:
        raise invalid(source, problems)
    return configs


def _warn_literal_secret(source: str, key: str) -> None:
    # A warning, not an error: the token works, but a config file gets copied and shared.
    message = (f"{source}: {key} holds a literal secret; write an environment reference such as "
               "${HF_TOKEN} so the file holds none (the value itself is never saved)")
    warnings.warn(message, UserWarning, stacklevel=3)


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
    for section, task in TASK_SECTIONS.items():
        if config.task != task and not config.stages:
            del raw[section]
    for section in STAGE_SECTIONS:
        if config.stage != section and not config.stages:
            del raw[section]
    if not config.stages:
        del raw["stages"]
    for path in SECRET_KEYS:
        assign(raw, path, None)
    for path, (text, loaded_value) in config._env_references.items():
        current = lookup(raw, path)
        if current is not MISSING and (current == loaded_value or path in SECRET_KEYS):
            assign(raw, path, text)
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


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
