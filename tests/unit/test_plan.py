"""dsft plan: parameter counts on the meta device, bytes per parameter and each engine's division, exact."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config import load_config
from dsft.errors import DsftError
from dsft.train.plan import GIB, activation_bytes, engine_estimate, make_plan, plan_run, state_bytes

# Qwen2, hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads, vocabulary 256, untied head.
SHAPE = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
# embeddings 256*64 + per layer (q 64*64+64, k and v 64*32+32, o 64*64, MLP 3*64*128, 2 norms of 64) * 2
# + final norm 64 + head 256*64
TOTAL = 16384 + (4160 + 2080 + 2080 + 4096 + 24576 + 128) * 2 + 64 + 16384
# LoRA r=8 on every linear but the head: r * (in + out) per layer: q 128, k 96, v 96, o 128, gate/up/down 192 each
LORA_R8 = 8 * (128 + 96 + 96 + 128 + 3 * 192) * 2


def _config(tmp_path, method: dict, **train):
    model_dir = tmp_path / "shape"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(SHAPE), encoding="utf-8")
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_files": ["unused.jsonl"], "max_length_tokens": 32},
        "method": method,
        "train": {"batch_size": 2, "chunked_loss": "off", **train},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_bytes_per_parameter():
    assert state_bytes(100, 100, 2) == state_bytes(100, 100, 4)  # nothing frozen
    full = state_bytes(100, 100, 2)
    assert (full.weights, full.gradients, full.optimizer) == (200, 200, 1200)  # 16 per parameter
    lora = state_bytes(1000, 10, 2)  # 2 x base + 16 x adapter
    assert lora.weights + lora.gradients + lora.optimizer == 2 * 990 + 16 * 10


def test_activation_formula():
    assert activation_bytes(2, 32, 64, 2, 256, False, None) == 34 * 64 * 64 * 2 + 4 * 64 * 256
    checkpointed = 2 * 64 * 64 * 2 + 34 * 64 * 64 + 4 * 16 * 256  # layer inputs, one layer, a 16-token loss chunk
    assert activation_bytes(2, 32, 64, 2, 256, True, 16) == checkpointed


def test_engine_division():
    states = state_bytes(1000, 1000, 2)  # 2000 weights, 2000 gradients, 12000 optimizer
    rows = {e: engine_estimate(e, states, 7, 4) for e in ("ddp", "zero2", "zero3", "fsdp2", "zero3_offload")}
    assert rows["ddp"].gpu_bytes == 16000 + 7
    assert (rows["zero2"].weights, rows["zero2"].gradients, rows["zero2"].optimizer) == (2000, 500, 3000)
    assert rows["zero3"].gpu_bytes == rows["fsdp2"].gpu_bytes == 4000 + 7
    assert (rows["zero3_offload"].gpu_bytes, rows["zero3_offload"].cpu_bytes) == (500 + 7, 500 + 3000)
    with pytest.raises(DsftError, match="unknown engine"):
        engine_estimate("zero1", states, 0, 4)


def test_recommends_the_first_engine_that_fits():
    # 10 GiB of parameters in full: 160 GiB of state, over 8 GPUs of 24 GiB (21.6 planned).
    plan = make_plan(10 * GIB, 10 * GIB, 2, 0, 8, 24)
    assert [round(e.gpu_bytes / GIB, 2) for e in plan.estimates] == [160, 20 + 140 / 8, 20, 20, 2 / 8 * 10]
    assert plan.recommended == "fsdp2"
    assert make_plan(10 * GIB, 10 * GIB, 2, 0, 1, 24).recommended == "zero3_offload"  # 20 GiB of gradients
    assert make_plan(10 * GIB, 10 * GIB, 2, 0, 1, 16).recommended is None


def test_plan_of_a_config_counts_on_meta(tmp_path):
    full = plan_run(load_config(_config(tmp_path, {"type": "full"})), 2, 80)
    assert (full.total_parameters, full.trainable_parameters) == (TOTAL, TOTAL)
    ddp = full.estimates[0]
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (2 * TOTAL, 2 * TOTAL, 12 * TOTAL)
    assert ddp.activations == 34 * 64 * 64 * 2 + 4 * 64 * 256
    lora = plan_run(load_config(_config(tmp_path, {"type": "lora", "lora": {"r": 8}})), 2, 80)
    assert (lora.total_parameters, lora.trainable_parameters) == (TOTAL + LORA_R8, LORA_R8)
    assert lora.recommended == "ddp"


def test_qlora_holds_its_quantized_linear_weights_in_about_half_a_byte(tmp_path):
    plan = plan_run(load_config(_config(tmp_path, {"type": "qlora", "lora": {"r": 8}})), 1, 80)
    assert (plan.total_parameters, plan.trainable_parameters) == (TOTAL + LORA_R8, LORA_R8)
    # Every linear but the head quantized: 4 bits plus a double-quantized scale per block of 64 values.
    linear = (4096 + 64 + 2048 + 32 + 2048 + 32 + 4096 + 24576 - 64 - 32 - 32) * 2  # weights only: biases are 1-D
    norms_and_biases = (64 + 32 + 32 + 2 * 64) * 2 + 64
    embeddings_and_head = 16384 * 2
    per_weight = (4 + (8 + 32 / 256) / 64) / 8
    expected = int(linear * per_weight + norms_and_biases * 4 + embeddings_and_head * 2)
    assert plan.estimates[0].weights == 2 * LORA_R8 + expected
    assert plan.method == (f"qlora (4-bit nf4, double quantization): trains 16,384 parameters (13.27%), holds the "
                           f"107,072 frozen ones in {expected / 2**20:.2f} MiB")


def test_cli_plan_json(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(_config(tmp_path, {"type": "full"})), "--gpus", "8", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["total_parameters"] == TOTAL and plan["recommended"] == "ddp" and plan["gpus"] == 8
    assert [e["engine"] for e in plan["estimates"]] == ["ddp", "zero2", "fsdp2", "zero3", "zero3_offload"]


def test_zero3_on_several_gpus_counts_the_full_logits_the_chunked_loss_cannot_spare(tmp_path):
    chunked = activation_bytes(2, 32, 64, 2, 256, False, 16)
    full = activation_bytes(2, 32, 64, 2, 256, False, None)
    config = load_config(_config(tmp_path, {"type": "full"}, chunked_loss="auto", loss_chunk_tokens=16))
    assert {e.engine: e.activations for e in plan_run(config, 2, 80).estimates} == {
        "ddp": chunked, "zero2": chunked, "fsdp2": chunked, "zero3": full, "zero3_offload": full}
    assert {e.activations for e in plan_run(config, 1, 80).estimates} == {chunked}


def test_a_known_hub_id_plans_from_its_published_shape_offline(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; no network is tried
    path = _config(tmp_path, {"type": "lora", "lora": {"r": 8}})
    override = ["model.name_or_path=deepseek-ai/DeepSeek-V4-Flash"]
    plan = plan_run(load_config(path, override), 8, 80)
    assert plan.model == "published shape deepseek-v4-flash (its config.json could not be read)"
    # V4-Flash's 284 B parameters, counted on the meta device; LoRA's adapters on top
    assert plan.total_parameters - plan.trainable_parameters == 284_325_869_015
    assert 0 < plan.trainable_parameters < 0.01 * plan.total_parameters
    result = CliRunner().invoke(app, ["plan", str(path), "--set", "model.name_or_path=deepseek-ai/DeepSeek-V3.2"])
    assert result.exit_code == 0, result.output
    assert "model: published shape deepseek-v3.2" in result.output
    unknown = CliRunner().invoke(app, ["plan", str(path), "--set", "model.name_or_path=someone/unknown-model"])
    assert unknown.exit_code == 1 and "cannot read the model config of someone/unknown-model" in str(unknown.exception)
    assert "deepseek-ai/DeepSeek-V4-Flash" in str(unknown.exception)
