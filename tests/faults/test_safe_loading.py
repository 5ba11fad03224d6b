"""Loading is safe: safetensors only, remote code only when asked (with a warning), no path out of a run.

Run directories are built by hand from a tiny preset, so each test controls exactly which files
are there: pickled weights, an escaping symlink, an adapter that names a foreign base.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from dsft.config import ModelConfig, dump_config, validate_config
from dsft.errors import DsftError, RemoteCodeWarning
from dsft.models.load import build_model, build_tokenizer, load_run
from dsft.models.presets import build_preset
from dsft.data.tokenizer import train_bpe_tokenizer

TEXTS = ["Convert 37 km to m.", "37000 m", "把 58 千克换算成克。", "58000 克"] * 8


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, 300)


@pytest.fixture(scope="module")
def local_model(tmp_path_factory, tokenizer) -> Path:
    """A local Hugging Face model directory (safetensors), as a downloaded hub model is."""
    directory = tmp_path_factory.mktemp("local-model")
    build_preset("tiny-llama", tokenizer, seed=0, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_config(run_dir: Path, method: str, model: dict) -> None:
    config = validate_config({"model": model, "data": {"train_files": ["train.jsonl"]}, "method": {"type": method}})
    (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")


def full_run(tmp_path: Path, tokenizer, pickled: bool = False) -> Path:
    run_dir = tmp_path / "full-run"
    model = build_preset("tiny-llama", tokenizer, seed=0, dtype=torch.float32)
    if pickled:
        # transformers 5 writes only safetensors; older tools (and attackers) write this.
        model.config.save_pretrained(run_dir)
        torch.save(model.state_dict(), run_dir / "pytorch_model.bin")
    else:
        model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    write_config(run_dir, "full", {"preset": "tiny-llama"})
    return run_dir


def lora_run(tmp_path: Path, tokenizer, pickled: bool = False, base: Path | None = None) -> Path:
    """A LoRA run: with base None, on its own base_model/ (a preset run); else on the local model base."""
    run_dir = tmp_path / "lora-run"
    model = build_preset("tiny-llama", tokenizer, seed=0, dtype=torch.float32)
    if base is None:
        model.save_pretrained(run_dir / "base_model")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(base or (run_dir / "base_model").resolve())
    if pickled:
        peft_model.peft_config["default"].save_pretrained(run_dir)
        torch.save(get_peft_model_state_dict(peft_model), run_dir / "adapter_model.bin")
    else:
        peft_model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    write_config(run_dir, "lora", {"preset": "tiny-llama"} if base is None else {"name_or_path": str(base)})
    return run_dir


def test_safetensors_runs_load(tmp_path, tokenizer, local_model):
    for run_dir in (full_run(tmp_path, tokenizer), lora_run(tmp_path, tokenizer), lora_run(tmp_path / "b", tokenizer, base=local_model)):
        model, _, _ = load_run(run_dir)
        assert not model.training


def test_pickled_model_weights_are_refused(tmp_path, tokenizer):
    run_dir = full_run(tmp_path, tokenizer, pickled=True)
    with pytest.raises(DsftError, match=r"full-run/pytorch_model.bin: pickled weights are not loaded"):
        load_run(run_dir)


def test_pickled_adapter_weights_are_refused(tmp_path, tokenizer):
    run_dir = lora_run(tmp_path, tokenizer, pickled=True)
    with pytest.raises(DsftError, match=r"lora-run/adapter_model.bin: pickled weights are not loaded"):
        load_run(run_dir)


def test_pickled_base_model_weights_are_refused(tmp_path, tokenizer):
    run_dir = lora_run(tmp_path, tokenizer)
    base_dir = run_dir / "base_model"
    state = build_preset("tiny-llama", tokenizer, seed=0, dtype=torch.float32).state_dict()
    (base_dir / "model.safetensors").unlink()
    torch.save(state, base_dir / "pytorch_model.bin")
    with pytest.raises(DsftError, match=r"base_model/pytorch_model.bin: pickled weights are not loaded"):
        load_run(run_dir)


def test_a_base_model_symlink_out_of_the_run_is_refused(tmp_path, tokenizer, local_model):
    run_dir = lora_run(tmp_path, tokenizer)
    shutil.rmtree(run_dir / "base_model")
    (run_dir / "base_model").symlink_to(local_model, target_is_directory=True)
    with pytest.raises(DsftError, match=r"base model directory 'base_model' resolves to .*, outside of"):
        load_run(run_dir)


def test_an_adapter_weights_symlink_out_of_the_run_is_refused(tmp_path, tokenizer):
    run_dir = lora_run(tmp_path, tokenizer)
    elsewhere = tmp_path / "elsewhere.safetensors"
    (run_dir / "adapter_model.safetensors").rename(elsewhere)
    (run_dir / "adapter_model.safetensors").symlink_to(elsewhere)
    with pytest.raises(DsftError, match=r"weights file .* resolves to .*elsewhere.safetensors, outside of"):
        load_run(run_dir)


def test_an_adapter_naming_a_foreign_base_is_refused(tmp_path, tokenizer, local_model):
    run_dir = lora_run(tmp_path, tokenizer, base=local_model)
    adapter_config = run_dir / "adapter_config.json"
    recorded = json.loads(adapter_config.read_text())
    adapter_config.write_text(json.dumps({**recorded, "base_model_name_or_path": str(tmp_path / "other-model")}))
    with pytest.raises(DsftError, match=r"base_model_name_or_path '.*other-model' is neither this run's base_model/"):
        load_run(run_dir)


def test_a_run_moved_with_its_base_model_still_loads(tmp_path, tokenizer):
    moved = tmp_path / "moved"
    shutil.move(lora_run(tmp_path, tokenizer), moved)
    model, _, _ = load_run(moved)
    assert not model.training


def test_trust_remote_code_warns_naming_the_repositories(local_model, tokenizer):
    model = ModelConfig(name_or_path=str(local_model), tokenizer=str(local_model), trust_remote_code=True)
    with pytest.warns(RemoteCodeWarning, match=rf"Python code from {local_model} runs on this machine"):
        loaded_tokenizer = build_tokenizer(model, Path("unused"), lambda: [])
    with pytest.warns(RemoteCodeWarning, match=rf"Python code from {local_model} runs on this machine"):
        assert build_model(model, loaded_tokenizer, seed=0).config.architectures == ["LlamaForCausalLM"]


def test_trust_remote_code_names_a_separate_tokenizer_repository(local_model, tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    model = ModelConfig(name_or_path=str(local_model), tokenizer=str(tmp_path / "tok"), trust_remote_code=True)
    with pytest.warns(RemoteCodeWarning, match=rf"from {local_model} and {tmp_path / 'tok'} runs"):
        build_tokenizer(model, Path("unused"), lambda: [])


def test_no_warning_without_trust_remote_code(local_model, recwarn):
    build_tokenizer(ModelConfig(name_or_path=str(local_model)), Path("unused"), lambda: [])
    assert not [w for w in recwarn if issubclass(w.category, RemoteCodeWarning)]
