"""The config as users see it, byte for byte, against golden files written before dsft/config/ became a package:
`dsft config show` of every run config in examples/, the JSON schemas of the run, serve and prepare configs (every
key path, type, default and docstring) and the error texts of typical mistakes. A change to any of them is a change
users see: regenerate with DSFT_WRITE_GOLDEN=1 only on purpose, and say so in the commit.

    DSFT_WRITE_GOLDEN=1 python -m pytest -q tests/unit/test_config_golden.py
"""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsft.cli import app
from dsft.errors import DsftError

ROOT = Path(__file__).parents[2]
GOLDEN = ROOT / "tests" / "golden" / "config"
RUN_CONFIGS = sorted(p for p in (ROOT / "examples").rglob("*.yaml") if p.parent.name not in ("prepare", "serve"))

MISTAKES = {
    "unknown_top_key": "model: {preset: tiny-qwen2}\ndata: {train_files: [a.jsonl]}\ntrian: {max_steps: 3}\n",
    "unknown_nested_key": "model: {preset: tiny-qwen2}\ndata:\n  train_files: [a.jsonl]\n  max_lenght_tokens: 8\n",
    "wrong_type": "model: {preset: tiny-qwen2}\ndata: {train_files: [a.jsonl]}\ntrain:\n  max_steps: many\n",
    "out_of_range": "model: {preset: tiny-qwen2}\ndata: {train_files: [a.jsonl]}\ntrain: {learning_rate: 0}\n",
    "missing_sections": "train: {max_steps: 3}\n",
    "bad_literal": "model: {preset: tiny-qwen2}\ndata: {train_files: [a.jsonl]}\nmethod: {type: lorra}\n",
    "model_and_preset": "model: {preset: tiny-qwen2, name_or_path: x}\ndata: {train_files: [a.jsonl]}\n",
    "missing_env": "model: {preset: tiny-qwen2, hub_token: '${DSFT_GOLDEN_UNSET}'}\ndata: {train_files: [a.jsonl]}\n",
    "stage_unknown": "stage: sftt\nmodel: {preset: tiny-qwen2}\ndata: {train_files: [a.jsonl]}\n",
    "not_a_mapping": "- model\n- data\n",
    "yaml_syntax": "model: {preset: tiny-qwen2\ndata: [\n",
    "stages_unknown_key": ("model: {preset: tiny-qwen2}\ndata: {train_files: [a.jsonl]}\n"
                           "stages:\n  - name: one\n    trian: {max_steps: 1}\n"),
}
SET_MISTAKES = {"set_without_equals": ["train.max_steps"], "set_unknown_key": ["train.max_stepz=3"],
                "set_wrong_type": ["train.max_steps=lots"]}
SERVE_MISTAKES = {"serve_unknown_key": "serve:\n  prot: 8000\n",
                  "serve_literal_key": "serve:\n  api_keys: [sk-literal]\n"}


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DSFT_WRITE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"no golden file {path}: write it with DSFT_WRITE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: p.stem)
def test_config_show_of_each_example_is_unchanged(config, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["config", "show", str(config.relative_to(ROOT))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    check(f"show_{config.stem}.yaml", result.output)


def test_the_schemas_are_unchanged():
    from dsft.config import RunConfig
    from dsft.config.serve import ServeFile
    from dsft.data.prepare_config import PrepareConfig

    for name, model in (("run", RunConfig), ("serve", ServeFile), ("prepare", PrepareConfig)):
        check(f"schema_{name}.json", json.dumps(model.model_json_schema(), indent=1, sort_keys=True) + "\n")


def _error(load, tmp_path: Path, text: str, *args) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DsftError) as caught:
        load(path, *args)
    return str(caught.value).replace(str(path), "<config>") + "\n"


def test_the_error_texts_are_unchanged(tmp_path, monkeypatch):
    from dsft.config import load_config
    from dsft.config.serve import load_serve_config

    monkeypatch.delenv("DSFT_GOLDEN_UNSET", raising=False)
    texts = [f"## {name}\n" + _error(load_config, tmp_path, text) for name, text in MISTAKES.items()]
    base = "model: {preset: tiny-qwen2}\ndata: {train_files: [a.jsonl]}\n"
    texts += [f"## {name}\n" + _error(load_config, tmp_path, base, sets) for name, sets in SET_MISTAKES.items()]
    texts += [f"## {name}\n" + _error(load_serve_config, tmp_path, text) for name, text in SERVE_MISTAKES.items()]
    check("errors.txt", "\n".join(texts))
