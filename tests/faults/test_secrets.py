"""No secret or data record reaches logs, progress output or saved files: checked with planted canaries.

The canary goes into the Hugging Face token (through ${HF_TOKEN}), into training answers, and into
bad records that on_error: skip reports. eval.generate_files stays unset on purpose: with it,
summary.json keeps sample prompts and answers by design.
"""

import json
import os
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest
import yaml

from dsft.config import dump_config, load_config
from dsft.errors import DsftError
from dsft.data.tokenizer import train_bpe_tokenizer
from tests.recipes.conftest import make_config

# Random per session, so no path, test name or cached file can contain it by chance.
CANARY = f"CANARY-{uuid.uuid4().hex[:12]}"


def dsft(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsft.cli", *map(str, args)], capture_output=True, text=True, env=env)


def planted_data(tmp_path: Path, train_file: Path) -> list[Path]:
    """Alpaca records whose answers carry the canary, and bad records (skipped) that carry it too."""
    records = [json.loads(line) for line in train_file.read_text(encoding="utf-8").splitlines()]
    for record in records[:8]:
        record["output"] += f" {CANARY}"
    records.append({"instruction": "Convert 1 km to m.", "output": [CANARY]})  # not a string
    alpaca = tmp_path / "planted.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + [f'{{"instruction": "{CANARY}", "output": ']
    alpaca.write_text("\n".join(lines) + "\n", encoding="utf-8")
    messages = tmp_path / "bad_messages.jsonl"
    bad_roles = [
        {"messages": [{"role": CANARY, "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": CANARY}, {"role": "assistant", "content": 7}]},
    ]
    messages.write_text("".join(json.dumps(r) + "\n" for r in bad_roles), encoding="utf-8")
    return [alpaca, messages]


def saved_tokenizer(tmp_path: Path, train_file: Path) -> Path:
    """A tokenizer trained on canary-free text: one trained on the planted data may hold canary merges."""
    texts = [json.loads(line)["instruction"] for line in train_file.read_text(encoding="utf-8").splitlines()]
    directory = tmp_path / "tokenizer"
    train_bpe_tokenizer(texts, 512).save_pretrained(directory)
    return directory


def files_holding(root: Path, needle: str) -> list[str]:
    """Every file under root whose bytes hold needle.

    All files are read: weights, tokenizer files, TensorBoard events (which hold TrainingArguments as
    JSON) and checkpoints (whose training_args.bin pickles TrainingArguments, so a token passed there
    would show).
    """
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes())


def test_canary_is_absent_from_output_and_every_file_of_the_run(tmp_path, tiny_data):
    config_path = make_config(
        tmp_path,
        tiny_data,
        model={"preset": "tiny-deepseek-v3", "tokenizer": str(saved_tokenizer(tmp_path, tiny_data["train"])),
               "hub_token": "${HF_TOKEN}"},
        data={"train_files": [str(p) for p in planted_data(tmp_path, tiny_data["train"])], "on_error": "skip"},
        train={"max_steps": 3, "save_steps": 2, "logging_steps": 1, "tensorboard": True},
    )
    env = {**os.environ, "HF_TOKEN": CANARY}
    process = dsft("train", config_path, env=env)
    assert process.returncode == 0, process.stderr
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["data"]["skipped_bad"] == 4, "the bad records were read, reported and skipped"
    assert "field 'messages[0].role': unknown role" in process.stdout, "the skip is reported, naming the field"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")) and list(run_dir.glob("checkpoints/*/trainer_state.json"))
    assert CANARY not in process.stdout and CANARY not in process.stderr
    assert files_holding(run_dir, CANARY) == []
    assert yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["model"]["hub_token"] == "${HF_TOKEN}"

    shown = dsft("config", "show", config_path, env=env)
    assert shown.returncode == 0 and "hub_token: ${HF_TOKEN}" in shown.stdout
    assert CANARY not in shown.stdout + shown.stderr


def test_a_literal_token_works_but_is_saved_as_null_with_a_warning(tmp_path, tiny_data):
    config_path = make_config(tmp_path, tiny_data, model={"preset": "tiny-llama", "hub_token": CANARY})
    with pytest.warns(UserWarning, match="model.hub_token holds a literal secret"):
        config = load_config(config_path)
    assert config.model.hub_token.get_secret_value() == CANARY
    assert CANARY not in repr(config) and CANARY not in str(config.model_dump())
    dumped = dump_config(config)
    assert CANARY not in dumped and yaml.safe_load(dumped)["model"]["hub_token"] is None


def test_a_referenced_token_warns_nothing_and_is_saved_as_its_reference(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    config_path = make_config(tmp_path, tiny_data, model={"preset": "tiny-llama", "hub_token": "${HF_TOKEN}"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config(config_path, ["data.max_length_tokens=128"])
    assert config.model.hub_token.get_secret_value() == CANARY
    assert yaml.safe_load(dump_config(config))["model"]["hub_token"] == "${HF_TOKEN}"


def test_config_errors_do_not_echo_a_secret(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    # Both a preset and a model path: the check of the whole model section fails.
    config_path = make_config(tmp_path, tiny_data, model={"preset": "tiny-llama", "name_or_path": "x", "hub_token": "${HF_TOKEN}"})
    with pytest.raises(DsftError) as info:
        load_config(config_path)
    assert "set exactly one of model.name_or_path" in str(info.value) and CANARY not in str(info.value)
