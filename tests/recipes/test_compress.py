"""`dsft compress` end to end on a tiny LoRA run trained to answer one sentence: the output is a plain Hugging Face
directory that transformers, dsft eval, generate and serve load, and its price comes from real measurement (a
prune so hard that the drop must exceed the bound fails the run)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from dsft.cli import app
from dsft.errors import DsftError
from tests.recipes.lifecycle_runs import train_lifecycle_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    return train_lifecycle_runs(tmp_path_factory.mktemp("compress"), tiny_data["train"], tracking_for_right=False)


def dsft(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_prune_layers_drops_the_least_influential_layer_into_a_loadable_model(runs, tmp_path):
    out = tmp_path / "pruned"
    result = dsft("compress", runs["right"], "--method", "prune-layers", "--out", out, "--eval", runs["test"],
                  "--set", "compress.calibration_samples=16", "--set", "eval.metrics=[exact_match, f1]")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "dsft_compress.json").read_text())
    details, price = record["details"], record["report"]
    dropped = details["dropped_layers"]
    assert len(dropped) == 1 and details["kept_layers"] == 3  # tiny-qwen2 has 4
    assert dropped == [min(range(4), key=lambda i: (details["block_influence"][i], -i))]
    assert record["calibration"]["path"] == str(runs["right_data"])  # the run's own training data by default
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert price["weights_bytes"]["compressed"] < price["weights_bytes"]["uncompressed"]
    assert price["load"]["compressed"]["parameters"] < price["load"]["uncompressed"]["parameters"]
    assert price["verdict"] == "measured" and {m["name"] for m in price["metrics"]} == {"exact_match", "f1"}
    assert (out / "compression_report.md").read_text().startswith("# Compression: prune-layers (measured)")
    assert (out / "eval" / "results.json").is_file()
    # The output is a model directory the other verbs load.
    from dsft.models.generate import DecodeSettings
    from dsft.serve.chat import generate_once

    reply = generate_once(out, "Convert 37 km to m.", None, DecodeSettings(max_new_tokens=12), 0)
    assert isinstance(reply, str)


def test_a_prune_too_hard_for_the_bound_fails_with_exit_1(runs, tmp_path):
    out = tmp_path / "sparse"
    result = dsft("compress", runs["right"], "--method", "prune-magnitude", "--out", out, "--eval", runs["test"],
                  "--set", "compress.sparsity=0.9", "--max-drop", "2%", "--set", "eval.metrics=[exact_match]")
    assert result.exit_code == 1, result.output
    price = json.loads((out / "dsft_compress.json").read_text())["report"]
    assert price["verdict"] == "failed"
    exact = next(m for m in price["metrics"] if m["name"] == "exact_match")
    assert exact["baseline"] == 1.0 and exact["candidate"] < 0.5 and not exact["passed"]
    zeros = price["load"]["compressed"]["zero_parameters"] - price["load"]["uncompressed"]["zero_parameters"]
    assert zeros == json.loads((out / "dsft_compress.json").read_text())["details"]["pruned_weights"]
    # Dense zeros: the file does not shrink, and the report says what the weights hold.
    assert price["weights_bytes"]["compressed"] == price["weights_bytes"]["uncompressed"]


def test_a_light_prune_passes_the_bound(runs, tmp_path):
    result = dsft("compress", runs["right"], "--method", "prune-magnitude", "--out", tmp_path / "light", "--eval",
                  runs["test"], "--set", "compress.sparsity=0.05", "--max-drop", "50%",
                  "--set", "eval.metrics=[exact_match]")
    assert result.exit_code == 0, result.output
    price = json.loads((tmp_path / "light" / "dsft_compress.json").read_text())["report"]
    assert price["verdict"] == "passed" and all(m["passed"] for m in price["metrics"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "light")
    weight = model.model.layers[0].mlp.up_proj.weight
    assert 0.04 < float((weight == 0).float().mean()) < 0.06


@pytest.mark.parametrize("method, stored", [("int8-dynamic", "Int8Tensor"), ("int8-weight", "Int8Tensor"),
                                            ("int4-weight", "IntxUnpackedToInt8Tensor")])
def test_torchao_quantization_is_saved_as_safetensors_and_loads_back_quantized(runs, tmp_path, method, stored):
    pytest.importorskip("torchao")
    out = tmp_path / method
    result = dsft("compress", runs["right"], "--method", method, "--out", out, "--eval", runs["test"],
                  "--max-drop", "50%", "--set", "eval.metrics=[exact_match]")
    assert result.exit_code == 0, result.output
    price = json.loads((out / "dsft_compress.json").read_text())["report"]
    assert price["verdict"] == "passed" and price["size_ratio"] > 2  # measured: float32 linears to 8 bits a weight
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == stored
    assert type(model.lm_head.weight) is torch.nn.Parameter and not list(out.glob("*.bin"))
    if method == "int8-dynamic":  # served as any model directory
        from openai import OpenAI

        from dsft.config.serve import load_serve_config
        from dsft.serve.models import load_served
        from dsft.serve.server import create_app, serve_in_thread

        config = load_serve_config(None)
        with serve_in_thread(create_app(load_served(str(out), config), config)) as url:
            reply = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).chat.completions.create(
                model=method, messages=[{"role": "user", "content": "Convert 37 km to m."}], max_tokens=8,
                temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_prune_experts_drops_each_layer_s_least_loaded_experts_and_cuts_the_router(tmp_path, tiny_data):
    from dsft.config import load_config
    from dsft.train.sft import run_sft
    from tests.recipes.conftest import make_config

    run = run_sft(load_config(make_config(tmp_path, tiny_data, train={"max_steps": 4}))).run_dir  # tiny-deepseek-v3
    out = tmp_path / "fewer"
    result = dsft("compress", run, "--method", "prune-experts", "--out", out, "--set", "compress.drop_experts=2",
                  "--set", "compress.calibration_samples=16")
    assert result.exit_code == 0, result.output
    details = json.loads((out / "dsft_compress.json").read_text())["details"]
    assert details["experts_before"] == 8 and details["experts_after"] == 6
    for layer, kept in details["kept_experts"].items():
        loads = details["calibration_loads"][layer]
        assert len(loads) == 8 and len(kept) == 6
        assert min(loads[i] for i in kept) >= max(loads[i] for i in range(8) if i not in kept)
    model = AutoModelForCausalLM.from_pretrained(out)
    moe = model.model.layers[1].mlp
    assert model.config.n_routed_experts == 6 and moe.gate.weight.shape[0] == 6
    assert moe.experts.gate_up_proj.shape[0] == 6 and moe.gate.e_score_correction_bias.shape == (6,)
    too_many = dsft("compress", out, "--method", "prune-experts", "--out", tmp_path / "again", "--calibration",
                    tiny_data["train"], "--set", "compress.drop_experts=5")
    assert "6 experts per layer leave 1, fewer than the 2 each token picks" in str(too_many.exception)


@pytest.mark.parametrize("args, message", [
    (("--method", "int3"), ("--method: Input should be 'int8-dynamic', 'int8-weight', 'int4-weight', "
                           "'prune-magnitude', 'prune-layers' or 'prune-experts'")),
    (("--method", "int4-weight", "--set", "compress.group_size=24"), "compress.group_size 24 does not divide"),
    (("--method", "prune-experts"), "prune-experts: the model has no MoE layers"),
    (("--method", "prune-magnitude", "--max-drop", "2%"), "--max-drop needs --eval"),
    (("--method", "prune-layers", "--set", "compress.drop_layers=4"), "the model has 4 decoder layers"),
    (("--method", "prune-layers", "--calibration", "missing.jsonl"), "--calibration missing.jsonl: no such file"),
    (("--method", "prune-magnitude", "--set", "compress.sparsity=1.5"), "compress.sparsity: Input should be less"),
])
def test_bad_compress_input_is_a_clear_error(runs, tmp_path, args, message):
    result = dsft("compress", runs["right"], "--out", tmp_path / "x", *args)
    assert isinstance(result.exception, DsftError) and message in str(result.exception), result.output
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_an_existing_output_is_never_overwritten(runs, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = dsft("compress", runs["right"], "--method", "prune-magnitude", "--out", tmp_path / "taken")
    assert "exists and is not empty" in str(result.exception)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_block_influence_ranks_an_identity_layer_lowest():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dsft.compress.prune import block_influence, drop_layers

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(config)
    middle = model.model.layers[1]
    for name in ("o_proj",):
        torch.nn.init.zeros_(getattr(middle.self_attn, name).weight)
    torch.nn.init.zeros_(middle.mlp.down_proj.weight)  # the layer adds nothing: output equals input
    influence = block_influence(model, [[1, 2, 3, 4, 5, 6]])
    assert influence[1] == pytest.approx(0.0, abs=1e-9) and min(influence[0], influence[2]) > 1e-4
    details = drop_layers(model, 1, influence)
    assert details["dropped_layers"] == [1] and model.config.num_hidden_layers == 2
    assert len(model.config.layer_types) == 2 and model.model.layers[1].self_attn.layer_idx == 1
