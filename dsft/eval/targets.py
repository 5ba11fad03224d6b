"""What `dsft eval` compares: a dsft run directory or a plain Hugging Face model (local dir or hub id)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from dsft.config import RunConfig
from dsft.data.chat import resolve_template
from dsft.errors import DsftError
from dsft.models.load import load_run, resolve_dtype


@dataclass
class EvalTarget:
    name: str
    model: object
    tokenizer: object
    template: str
    """Chat template the prompts are rendered with: the run's own, else resolved for the tokenizer."""
    identity: dict = field(default_factory=dict)
    config: RunConfig | None = None
    """The run's config; None for a plain model."""

    @property
    def thinking(self) -> bool | None:
        """The run's data.thinking (dsft.data.chat's thinking); None (the template's default) for a plain model."""
        return None if self.config is None else self.config.data.thinking_mode


def weights_sha256(directory: Path) -> str | None:
    """One digest over every safetensors file of a directory (sorted by name), or None if it has none."""
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load_target(name_or_path: str) -> EvalTarget:
    """Load a run directory (with its template and config) or a plain model (safetensors only)."""
    path = Path(name_or_path)
    if (path / "config.yaml").is_file():
        model, tokenizer, config = load_run(path)
        identity = {"path": str(path.resolve()), "kind": "run", "weights_sha256": weights_sha256(path)}
        return EvalTarget(name_or_path, model, tokenizer, config.data.chat_template, identity, config)
    model, tokenizer = _load_plain(name_or_path)
    identity = {"path": str(path.resolve()) if path.exists() else name_or_path, "kind": "model",
                "weights_sha256": weights_sha256(path)}
    return EvalTarget(name_or_path, model, tokenizer, resolve_template("auto", tokenizer), identity)


def _load_plain(name_or_path: str):
    from transformers import AutoModelForCausalLM

    from dsft.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype("auto"), use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise DsftError(
            f"{name_or_path}: neither a dsft run directory (no config.yaml) nor a loadable Hugging Face model "
            f"with safetensors weights: {str(exc).splitlines()[0]}"
        ) from None
    model.eval()
    return model, tokenizer
