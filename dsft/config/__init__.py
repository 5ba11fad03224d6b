"""dsft's typed configs, one module per family of sections:

- `loader`: YAML with line numbers, `${NAME}` environment references, `--set key.path=value`, and errors naming the
  key path, its line and what is allowed (for any pydantic model: `load_yaml_model`);
- `base`: what every section shares (unknown keys are errors, docstrings are descriptions);
- `model` (model, data), `method` (full, freeze and the PEFT adapters), `train`, `eval`, `tasks` (classify, token_classify, multitask) and `preference`
  (reward, dpo, grpo, ppo): the sections of a run config;
- `run`: `RunConfig`, its loading, multi-stage runs and `dump_config` (what `dsft config show` prints);
- `serve`: the config of `dsft serve`.

A new section goes in the module of its family (or a new one beside them) and its field on `RunConfig`; the names
below are what the rest of dsft imports.
"""

from dsft.config.eval import CheckConfig, EvalConfig
from dsft.config.loader import apply_override, expand_env_references, load_yaml_model
from dsft.config.method import FreezeConfig, LoraConfig, MethodConfig, UnfreezeStep
from dsft.config.model import DataConfig, ModelConfig
from dsft.config.preference import (
    DpoConfig,
    GrpoConfig,
    PpoConfig,
    RewardFunctionConfig,
    RewardModelConfig,
    SamplingConfig,
)
from dsft.config.run import OutputConfig, RunConfig, dump_config, load_config, validate_config, validate_files
from dsft.config.tasks import ClassifyConfig, HeadConfig, MultitaskConfig, TokenClassifyConfig
from dsft.config.train import AdversarialConfig, TrainConfig

__all__ = [
    "AdversarialConfig", "CheckConfig", "ClassifyConfig", "DataConfig", "DpoConfig", "EvalConfig", "FreezeConfig",
    "GrpoConfig", "HeadConfig", "LoraConfig", "MethodConfig", "ModelConfig", "MultitaskConfig", "OutputConfig",
    "PpoConfig", "RewardFunctionConfig", "RewardModelConfig", "RunConfig", "SamplingConfig", "TokenClassifyConfig",
    "TrainConfig", "UnfreezeStep", "apply_override", "dump_config", "expand_env_references", "load_config",
    "load_yaml_model", "validate_config", "validate_files",
]
