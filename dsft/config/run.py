"""The typed run config: one YAML file with sections model, data, method, train, eval, output (each family of
sections in its own module of dsft/config/), the task and stage sections, and multi-stage runs.

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
from pydantic import PrivateAttr, ValidationError, model_validator

from dsft.config.base import Section
from dsft.config.eval import EvalConfig
from dsft.config.gate import GateConfig
from dsft.config.loader import (
    MISSING,
    apply_override,
    assign,
    deep_merge,
    describe,
    expand_env_references,
    invalid,
    lookup,
    parse_yaml,
    read_text,
    where,
)
from dsft.config.method import SECTION_TYPES, MethodConfig
from dsft.config.model import DataConfig, ModelConfig
from dsft.config.preference import DpoConfig, GrpoConfig, KtoConfig, PpoConfig, RewardModelConfig
from dsft.config.tasks import ClassifyConfig, MultitaskConfig, TokenClassifyConfig
from dsft.config.tracking import TrackingConfig
from dsft.config.train import TrainConfig
from dsft.errors import DsftError

SECRET_KEYS = (("model", "hub_token"),)
"""Key paths of secrets: saved only as the ${NAME} reference the config wrote, else as null."""


class OutputConfig(Section):
    dir: str = "runs/dsft-run"
    """Run directory: model or adapter, tokenizer, config.yaml, metrics.jsonl, summary.json, checkpoints/."""
    overwrite: bool = False
    """Replace an existing run directory instead of stopping with an error."""


TASK_SECTIONS = {"classify": "classification", "token_classify": "token_classification", "multitask": "multitask"}
"""Config section of each head task, written only for its task."""
STAGE_SECTIONS = ("reward", "dpo", "kto", "grpo", "ppo")
"""Config sections named after their stage, written only for that stage."""


class RunConfig(Section):
    stage: Literal["sft", "reward", "dpo", "kto", "grpo", "ppo"] = "sft"
    """Training stage: sft (supervised fine-tuning, or the head task), reward (a reward model on preference
    pairs), dpo (direct preference optimization), kto (answers labelled desirable or not, unpaired), grpo (group
    relative policy optimization) or ppo."""
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
    kto: KtoConfig = KtoConfig()
    """Settings for stage kto."""
    grpo: GrpoConfig = GrpoConfig()
    """Settings for stage grpo: group size, sampling, KL, clipping, reward components."""
    ppo: PpoConfig = PpoConfig()
    """Settings for stage ppo: sampling, GAE, KL and entropy coefficients, clipping, reward components."""
    tracking: TrackingConfig = TrackingConfig()
    """Experiment tracking (MLflow)."""
    gate: GateConfig = GateConfig()
    """The regression gate `dsft gate` applies to this run against a baseline."""
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
        if self.task == "multitask" and self.method.type == "qlora":
            raise ValueError("task multitask does not train on a quantized base yet: method.type lora, full or freeze")
        if self.task == "causal_lm":
            return self
        if self.data.columns or self.data.tags.any_set():
            section = next(name for name, task in TASK_SECTIONS.items() if task == self.task)
            raise ValueError(f"data.columns and data.tags rename the fields of chat, text and preference records; task "
                             f"{self.task} names the fields it reads in its {section} section: remove them")
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
    for section, types in SECTION_TYPES.items():
        if config.method.type not in types:
            del raw["method"][section]
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
