"""${NAME} environment references in configs: expanded for the run, written back (never their values) when saved."""

from pathlib import Path

import pytest
import yaml

from dsft.config import dump_config, expand_env_references, load_config, validate_config
from dsft.errors import DsftError

MINIMAL = "model:\n  preset: tiny-llama\ndata:\n  train_files: train.jsonl\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_references_expand_with_defaults_as_in_the_shell(monkeypatch):
    monkeypatch.setenv("DATA", "/data")
    monkeypatch.setenv("EMPTY", "")
    monkeypatch.delenv("UNSET", raising=False)
    raw = {"a": "${DATA}/t.jsonl", "b": ["${UNSET:-x}", "${EMPTY:-y}", "${EMPTY}"], "c": 3, "d": "plain $HOME"}
    expanded, references, problems = expand_env_references(raw)
    assert expanded == {"a": "/data/t.jsonl", "b": ["x", "y", ""], "c": 3, "d": "plain $HOME"}
    assert references == {("a",): "${DATA}/t.jsonl", ("b", 0): "${UNSET:-x}", ("b", 1): "${EMPTY:-y}", ("b", 2): "${EMPTY}"}
    assert problems == []


def test_a_missing_variable_names_the_key_line_and_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("DSFT_NOWHERE", raising=False)
    with pytest.raises(DsftError) as info:
        load_config(write(tmp_path, MINIMAL + "output:\n  dir: ${DSFT_NOWHERE}/run\n"))
    assert "output.dir (line 6): environment variable DSFT_NOWHERE is not set" in str(info.value)


def test_a_malformed_reference_is_an_error(tmp_path):
    with pytest.raises(DsftError, match=r"output.dir \(line 6\): malformed environment reference"):
        load_config(write(tmp_path, MINIMAL + "output:\n  dir: ${DSFT-DIR}/run\n"))


def test_values_are_used_and_references_are_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("DSFT_DATA", "/secret/place")
    monkeypatch.setenv("DSFT_LR", "1e-4")
    text = MINIMAL.replace("train.jsonl", "${DSFT_DATA}/train.jsonl") + "train:\n  learning_rate: ${DSFT_LR}\n"
    config = load_config(write(tmp_path, text), ["output.dir=${DSFT_DATA}/run"])
    assert config.data.train_files == ["/secret/place/train.jsonl"] and config.train.learning_rate == 1e-4
    assert config.output.dir == "/secret/place/run"
    dumped = dump_config(config)
    assert "/secret/place" not in dumped and "0.0001" not in dumped
    saved = yaml.safe_load(dumped)
    assert saved["data"]["train_files"] == "${DSFT_DATA}/train.jsonl"
    assert saved["train"]["learning_rate"] == "${DSFT_LR}" and saved["output"]["dir"] == "${DSFT_DATA}/run"
    assert validate_config(saved) == config, "the saved file loads back to the same values"


def test_references_survive_model_copy_and_updated_fields_keep_their_new_value(tmp_path, monkeypatch):
    """What sft.py does before saving: data.chat_template replaced by the resolved template."""
    monkeypatch.setenv("DSFT_DATA", "/secret/place")
    text = MINIMAL.replace("train.jsonl", "${DSFT_DATA}/train.jsonl") + "  chat_template: ${DSFT_TEMPLATE:-auto}\n"
    config = load_config(write(tmp_path, text))
    config = config.model_copy(update={"data": config.data.model_copy(update={"chat_template": "deepseek_r1"})})
    saved = yaml.safe_load(dump_config(config))["data"]
    assert saved["chat_template"] == "deepseek_r1"
    assert saved["train_files"] == "${DSFT_DATA}/train.jsonl"
