"""dsft export end to end: runs trained by the real CLI come out as plain Hugging Face model directories whose
logits equal the run's (merged LoRA on Qwen2, on DeepSeek-V3 attention and routed experts, on a classifier; a full
run; an adapter kept separate, loaded by plain PEFT), and the export refuses what it must."""

import json
import shutil

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

from dsft.cli import app
from dsft.errors import DsftError
from dsft.export.export import export_run
from dsft.models.load import load_run

from .conftest import make_config
from .test_classify import classify_config, labelled_data  # noqa: F401  (fixture)

PROMPTS = ["Convert 37 km to m.", "How many grams are 2 kg?"]
RUN_FILES = ("config.yaml", "checkpoints", "metrics.jsonl", "summary.json", "samples.jsonl", "README.md")


def _invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _train(tmp_path, tiny_data, **sections):
    sections.setdefault("train", {"max_steps": 3, "learning_rate": 1e-2})
    _invoke("train", make_config(tmp_path, tiny_data, **sections))
    return tmp_path / "run"


def _logits(model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _assert_same_logits(exported, run_dir):
    # This process, one CPU path; merged weights against base + adapter: rtol 1e-5 holds on each path the suite checks.
    model, tokenizer, _ = load_run(run_dir)
    torch.testing.assert_close(_logits(exported, tokenizer), _logits(model, tokenizer), rtol=1e-5, atol=1e-5)


def _stored(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return tensors


def _changed(merged: dict, base: dict, fragment: str) -> list[str]:
    """Keys containing fragment whose merged tensor differs from the base's: the trained update is in them."""
    return [k for k in base if fragment in k and (merged[k] - base[k]).abs().max() > 1e-4]


@pytest.fixture(scope="module")
def qwen_lora_run(tmp_path_factory, tiny_data):
    return _train(tmp_path_factory.mktemp("qwen"), tiny_data, model={"preset": "tiny-qwen2"})


def test_merged_lora_export_loads_in_plain_transformers_with_the_runs_logits(qwen_lora_run, tmp_path):
    out = tmp_path / "merged"
    output = _invoke("export", qwen_lora_run, "--out", out, "--merge")
    assert "adapter merged into its base" in output
    _assert_same_logits(AutoModelForCausalLM.from_pretrained(out), qwen_lora_run)
    assert _changed(_stored(out), _stored(qwen_lora_run / "base_model"), "self_attn.q_proj")
    assert not any((out / name).exists() for name in RUN_FILES) and not (out / "adapter_config.json").exists()
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "dsft_export.json").read_text())
    assert record["run_dir"] == str(qwen_lora_run.resolve()) and record["adapter"] == "merged"
    assert record["method"] == "lora" and record["dtypes"] == ["float32"] and len(record["config_sha256"]) == 64


def test_adapter_kept_separate_loads_in_plain_peft_on_its_exported_base(qwen_lora_run, tmp_path):
    out = tmp_path / "adapter"
    _invoke("export", qwen_lora_run, "--out", out)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(out.resolve() / "base_model")
    assert (out / "base_model" / "model.safetensors").is_file() and (out / "adapter_model.safetensors").is_file()
    _assert_same_logits(AutoPeftModelForCausalLM.from_pretrained(out), qwen_lora_run)


def test_deepseek_lora_on_attention_and_routed_experts_merges_into_several_shards(tmp_path, tiny_data):
    # all-linear on DeepSeek-V3: MLA projections, plus the dense MLP, the shared and the fused routed experts as
    # PEFT parameters (models/moe_targets.py; the router stays frozen under an adapter).
    run = _train(tmp_path, tiny_data)
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj", "shared_experts.down_proj.weight",
            "mlp.down_proj.weight"} <= set(adapter_config["target_parameters"])
    assert "kv_b_proj" in adapter_config["target_modules"]
    out = tmp_path / "merged"
    _invoke("export", run, "--out", out, "--merge", "--max-shard-size", "1MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 4 and files == {p.name for p in out.glob("*.safetensors")}
    # The base's own format, which vLLM reads: one tensor per routed expert and projection.
    merged, base = _stored(out), _stored(run / "base_model")
    assert set(index["weight_map"]) == set(merged) == set(base)
    assert "model.layers.2.mlp.experts.7.gate_proj.weight" in merged
    assert _changed(merged, base, ".mlp.experts.") and _changed(merged, base, "kv_b_proj")
    assert _changed(merged, base, "shared_experts") and _changed(merged, base, "layers.0.mlp.gate_proj")
    _assert_same_logits(AutoModelForCausalLM.from_pretrained(out), run)


def test_classifier_lora_export_keeps_its_labels_and_logits(tmp_path, labelled_data):  # noqa: F811
    path = classify_config(tmp_path, labelled_data, model={"preset": "tiny-qwen2"}, train={"max_steps": 3})
    _invoke("train", path)
    run, out = tmp_path / "run", tmp_path / "merged"
    _invoke("export", run, "--out", out, "--merge")
    exported = AutoModelForSequenceClassification.from_pretrained(out)
    assert exported.config.id2label == {0: "distance", 1: "money", 2: "weight"}
    _assert_same_logits(exported, run)


def test_full_run_export_copies_the_model_and_converts_on_request(tmp_path, tiny_data):
    run = _train(tmp_path, tiny_data, model={"preset": "tiny-llama"}, method={"type": "full"})
    _invoke("export", run, "--out", tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    _assert_same_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "copy"), run)
    _invoke("export", run, "--out", tmp_path / "bf16", "--dtype", "bfloat16", "--max-shard-size", "500KB")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert exported.dtype == torch.bfloat16 and len(list((tmp_path / "bf16").glob("*.safetensors"))) > 1


def test_export_refuses_bad_targets_and_pickled_weights(qwen_lora_run, tmp_path):
    with pytest.raises(DsftError, match="not a dsft run directory"):
        export_run(tmp_path, tmp_path / "out")
    with pytest.raises(DsftError, match="lies inside the run directory"):
        export_run(qwen_lora_run, qwen_lora_run / "export")
    with pytest.raises(DsftError, match="contains the run directory"):
        export_run(qwen_lora_run, qwen_lora_run.parent, overwrite=True)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(DsftError, match="exists and is not empty"):
        export_run(qwen_lora_run, taken)
    export_run(qwen_lora_run, taken, overwrite=True)
    assert not (taken / "notes.txt").exists() and (taken / "adapter_config.json").is_file()
    with pytest.raises(DsftError, match="--dtype"):
        export_run(qwen_lora_run, tmp_path / "x", dtype="int8")
    pickled = tmp_path / "pickled"
    shutil.copytree(qwen_lora_run, pickled, ignore=shutil.ignore_patterns("checkpoints", "base_model"))
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(DsftError, match="pickled weights are not loaded"):
        export_run(pickled, tmp_path / "y", merge=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_lora_run_on_a_local_model_directory_exports_merged_or_with_a_copy_of_it(qwen_lora_run, tmp_path, tiny_data):
    base = tmp_path / "base"
    export_run(qwen_lora_run, base, merge=True)
    run = _train(tmp_path, tiny_data, model={"name_or_path": str(base)})
    assert not (run / "base_model").exists()
    export_run(run, tmp_path / "merged", merge=True)
    _assert_same_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), run)
    export_run(run, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "base_model" / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    _assert_same_logits(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter"), run)


def test_a_hub_base_is_named_not_copied_and_its_fetch_failure_is_an_error(qwen_lora_run, tmp_path, monkeypatch):
    run = tmp_path / "hub_run"
    shutil.copytree(qwen_lora_run, run, ignore=shutil.ignore_patterns("checkpoints", "base_model"))
    config_text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config_text.replace("name_or_path: null", "name_or_path: nobody/no-such-model")
                                     .replace("preset: tiny-qwen2", "preset: null"))
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": "nobody/no-such-model"}))
    export_run(run, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "nobody/no-such-model"
    assert not (tmp_path / "adapter" / "base_model").exists()
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; no network is tried
    with pytest.raises(DsftError, match="cannot fetch the safetensors of 'nobody/no-such-model'"):
        export_run(run, tmp_path / "merged", merge=True)
