"""What one server serves: a run (or plain model directory), more LoRA runs on the same base, and canary aliases.

Everything is loaded once at startup from paths the operator gave; a request names a model only by a name looked up
in a fixed table, so nothing a client sends ever reaches the file system. LoRA runs share one base in memory as
PEFT adapters (load_adapter); a batch holds one adapter's requests and set_adapter picks it before generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsft.config.serve import CanaryConfig, ServeConfig, ShadowConfig
from dsft.errors import DsftError
from dsft.paths import resolve_inside

ADAPTER_PREFIX = "served_"
"""PEFT adapter names are served_1, served_2, ...: served names may hold dots, which PEFT's module keys cannot."""


@dataclass(frozen=True)
class ServedModel:
    name: str
    adapter: str | None
    """PEFT adapter to activate; None: the model as loaded, with any adapters disabled."""
    template: str
    """Chat template the model's prompts are rendered with: its run's own (as in training)."""
    source: str
    """Where it was loaded from (logged at startup)."""
    thinking: bool | None = None
    """Its run's data.thinking (dsft.data.chat's), the default of a request's chat_template_kwargs.thinking."""
    registry: tuple[str, str] | None = None
    """(registered model, version) when it was served from registry:NAME@ALIAS: its deployments are logged there."""


class ServedModels:
    """The model, its tokenizer, the served names, and the canary and shadow settings (checked against the names)."""

    def __init__(self, model, tokenizer, served: list[ServedModel], canary: CanaryConfig | None = None,
                 shadow: ShadowConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.by_name = {entry.name: entry for entry in served}
        self.canary, self.shadow = canary, shadow
        if canary is not None:
            _check_canary(canary, list(self.by_name))
        if shadow is not None:
            _check_shadow(shadow, list(self.by_name))

    def names(self) -> list[str]:
        """Every name a request may use: served models, then the canary alias."""
        return [*self.by_name, *([self.canary.alias] if self.canary else [])]

    def resolve(self, requested: str, route: Callable[[], str] | None = None) -> ServedModel | None:
        """The served model a request's model field selects (the canary alias: the one route() draws), or None."""
        if self.canary is not None and requested == self.canary.alias and route is not None:
            return self.by_name[route()]
        return self.by_name.get(requested)

    @contextlib.contextmanager
    def activate(self, name: str):
        """Make name's adapter the active one (or turn adapters off) for the generation inside the block."""
        entry = self.by_name[name]
        if not hasattr(self.model, "peft_config"):
            yield
        elif entry.adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(entry.adapter)
            yield


def _check_shadow(shadow: ShadowConfig, names: list[str]) -> None:
    for key in ("primary", "candidate"):
        if getattr(shadow, key) not in names:
            raise DsftError(f"serve.shadow.{key} {getattr(shadow, key)!r} is not served; served: {', '.join(names)}")
    if shadow.primary == shadow.candidate:
        raise DsftError("serve.shadow: primary and candidate are the same model; shadow another one")


def _check_canary(canary: CanaryConfig, names: list[str]) -> None:
    if canary.alias in names:
        raise DsftError(f"serve.canary.alias {canary.alias!r} is already a served model name; pick another alias")
    for key in ("primary", "candidate"):
        if getattr(canary, key) not in names:
            raise DsftError(f"serve.canary.{key} {getattr(canary, key)!r} is not served; served: {', '.join(names)}")


def load_served(target: str, config: ServeConfig) -> ServedModels:
    """Load RUN_OR_DIR and every adapter run of config.adapters onto its base; raises DsftError for a run that is not
    a causal LM, an adapter run on another base or tokenizer, or a name used twice."""
    from dsft.eval.targets import load_target

    target, primary_version, default_name = _from_registry(target, config)
    loaded = load_target(target)
    _require_causal_lm(loaded.config, target)
    primary_name = config.model_name or default_name
    model, primary_adapter = loaded.model, ("default" if hasattr(loaded.model, "peft_config") else None)
    served = [ServedModel(primary_name, primary_adapter, loaded.template, str(target), loaded.thinking,
                          primary_version)]
    base_identity = _base_identity(Path(target), loaded.config)
    for i, (name, written) in enumerate(config.adapters.items(), 1):
        if name in (entry.name for entry in served):
            raise DsftError(f"serve.adapters.{name}: the name is served already; give each model its own name")
        run_dir, version, _ = _from_registry(written, config)
        data = _check_adapter_run(Path(run_dir), name, base_identity, loaded.tokenizer)
        model = _attach_adapter(model, Path(run_dir), f"{ADAPTER_PREFIX}{i}")
        served.append(ServedModel(name, f"{ADAPTER_PREFIX}{i}", data.chat_template, run_dir, data.thinking_mode,
                                  version))
    model.eval()
    return ServedModels(_on_gpu_if_any(model), loaded.tokenizer, served, config.canary, config.shadow)


def _from_registry(written: str, config: ServeConfig) -> tuple[str, tuple[str, str] | None, str]:
    """(directory, (model, version) or None, default served name) of a target or adapter as written: a path, or
    registry:NAME@ALIAS resolved in serve.registry_uri's store (served as NAME by default)."""
    from dsft.lifecycle.registry import REF_PREFIX, Ref, Registry

    if not written.startswith(REF_PREFIX):
        return written, None, Path(written).resolve().name
    ref = Ref.parse(written)
    registry = Registry(config.registry_uri)
    version = registry.version(ref)
    return str(registry.run_dir(ref)), (ref.name, str(version.version)), ref.name


def _on_gpu_if_any(model):
    """Runs load on the CPU; a server generates on the GPU when there is one."""
    import torch

    return model.to("cuda") if torch.cuda.is_available() else model


def _require_causal_lm(run_config, source: str) -> None:
    from dsft.models.load import run_task

    if run_config is not None and (run_config.task != "causal_lm" or run_task(run_config) != "causal_lm"):
        raise DsftError(f"{source}: a {run_task(run_config)} run has no text replies to serve; serve a causal_lm run")


def _base_identity(directory: Path, run_config) -> str | None:
    """What an adapter's base must equal: the weights digest of the run's base_model/ (a LoRA run) or of the
    directory itself (a full model), else the hub id its config names."""
    from dsft.eval.targets import weights_sha256
    from dsft.models.load import ADAPTER_CONFIG_FILE, BASE_MODEL_DIR

    if (directory / ADAPTER_CONFIG_FILE).is_file():
        digest = weights_sha256(directory / BASE_MODEL_DIR)
        return digest if digest is not None else run_config.model.name_or_path
    return weights_sha256(directory)


def _check_adapter_run(run_dir: Path, name: str, base_identity: str | None, tokenizer):
    """Check that run_dir is a LoRA run (safetensors inside it) on the served base with the same tokenizer;
    returns its data section (chat template and thinking)."""
    from dsft.config import load_config
    from dsft.data.tokenizer import load_tokenizer
    from dsft.models.load import ADAPTER_CONFIG_FILE

    key = f"serve.adapters.{name}"
    config_path = resolve_inside(run_dir.resolve(), "config.yaml", "run config")
    weights = resolve_inside(run_dir.resolve(), "adapter_model.safetensors", "adapter weights")
    if not (config_path.is_file() and (run_dir / ADAPTER_CONFIG_FILE).is_file() and weights.is_file()):
        raise DsftError(f"{key}: {run_dir} is not a LoRA run directory (config.yaml, {ADAPTER_CONFIG_FILE} and "
                        "adapter_model.safetensors)")
    run_config = load_config(config_path)
    _require_causal_lm(run_config, key)
    identity = _base_identity(run_dir, run_config)
    if identity is None or identity != base_identity:
        raise DsftError(f"{key}: {run_dir} was trained on another base than the served model ({identity} vs "
                        f"{base_identity}); adapters share one base")
    if load_tokenizer(run_dir).get_vocab() != tokenizer.get_vocab():
        raise DsftError(f"{key}: {run_dir} has another tokenizer than the served model; adapters share one tokenizer")
    return run_config.data


def _attach_adapter(model, run_dir: Path, adapter_name: str):
    """Load run_dir's adapter into model (a PeftModel after the first one), from safetensors."""
    from peft import PeftModel

    from dsft.models.method import fused_expert_patterns

    with fused_expert_patterns():  # PEFT's false warning about its own fused-expert patterns (models/method.py)
        if hasattr(model, "peft_config"):
            model.load_adapter(str(run_dir), adapter_name=adapter_name, is_trainable=False)
            return model
        # A full model gains adapters here; its own name is served with the adapters disabled.
        return PeftModel.from_pretrained(model, str(run_dir), adapter_name=adapter_name, is_trainable=False)
