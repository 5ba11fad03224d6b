"""QLoRA (method.type qlora) on CPU, bitsandbytes' own CPU backend: a LoRA adapter trains on a real 4-bit NF4 base
(tiny DeepSeek-V3) and the loss falls; the base stays 4-bit and bit-identical; the run directory holds the adapter,
its 16-bit base and the record of what was quantized; `dsft export --merge` rebuilds each quantized weight as
training computed with it, so the merged model's logits equal the run's (and a merge into the plain 16-bit base
would not); 8-bit and FP4 bases train too. Resume: tests/faults/test_resume_kill.py; the other stages: the qlora
tests of test_classify, test_reward, test_dpo, test_grpo and test_ppo."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config import load_config
from dsft.errors import DsftError
from dsft.models.load import BASE_MODEL_DIR, build_quantized, load_run
from dsft.models.quantize import QUANTIZATION_FILE, is_quantized_weight
from dsft.train.sft import run_sft

from ..learning import NOT_LEARNING, Claim, assert_learned, assert_not_learned, learning
from .conftest import make_config, train_losses

QLORA = {"type": "qlora", "lora": {"r": 8, "alpha": 16}}
TRAIN = {"max_steps": 30, "learning_rate": 3e-3, "logging_steps": 1}


def qlora_config(tmp_path, tiny_data, method=QLORA, **train):
    return make_config(tmp_path, tiny_data, method=method, train={**TRAIN, **train})


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_data):
    tmp_path = tmp_path_factory.mktemp("qlora")
    return run_sft(load_config(qlora_config(tmp_path, tiny_data)))


def loss_claims(run_dir) -> list[Claim]:
    losses = train_losses(run_dir)
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    # 30 steps: the same drop as 16-bit LoRA's (5.66 -> 4.74); measured on the CPU paths of tests/cpu_paths.sh below.
    return [Claim("train loss, mean of the first 3 steps - the last 3", first - last, ">", 0.5)]


@learning
def test_an_adapter_on_a_4bit_base_learns(qlora_run):
    assert_learned(loss_claims(qlora_run.run_dir))


@learning
def test_a_qlora_run_that_does_not_learn_fails_the_claims(tmp_path, tiny_data):
    assert_not_learned(loss_claims(run_sft(load_config(qlora_config(tmp_path, tiny_data, **NOT_LEARNING))).run_dir))


def test_the_base_stays_4bit_and_unchanged_and_only_the_adapter_is_saved(qlora_run):
    run_dir, config = qlora_run.run_dir, load_config(qlora_run.run_dir / "config.yaml")
    fresh = build_quantized(config.model, qlora_run.tokenizer, config.method, run_dir / BASE_MODEL_DIR)
    trained = dict(qlora_run.model.get_base_model().named_parameters())
    record = json.loads((run_dir / QUANTIZATION_FILE).read_text())
    assert record["qlora"]["quant_type"] == "nf4" and record["weights"]
    for name, parameter in fresh.named_parameters():
        if not is_quantized_weight(parameter):
            continue
        assert name in record["weights"]
        after = trained.get(name.replace(".weight", ".base_layer.weight"), trained.get(name))  # adapted or not
        assert type(after).__name__ == "Params4bit" and not after.requires_grad
        assert torch.equal(after.data, parameter.data), name  # the packed 4-bit codes, bit for bit
        assert torch.equal(after.quant_state.absmax, parameter.quant_state.absmax), name
    trainable = {n for n, p in qlora_run.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert (run_dir / "adapter_model.safetensors").is_file() and not (run_dir / "model.safetensors").exists()
    summary = qlora_run.summary
    assert summary["method"] == "qlora" and 0 < summary["quantization"]["quantized_share"] < 1
    # tiny DeepSeek-V3's routed experts are fused 3D tensors, which bitsandbytes leaves in the compute dtype.
    assert summary["quantization"]["unquantized_parameters"]["DeepseekV3Experts.gate_up_proj"] > 0


def _logits(model, tokenizer):
    ids = tokenizer("把 424 米换算成厘米。", return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits.float()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_merged_export_computes_what_the_run_computes(tmp_path, tiny_data, quant_type):
    method = {**QLORA, "qlora": {"quant_type": quant_type}}
    run_dir = run_sft(load_config(qlora_config(tmp_path, tiny_data, method, max_steps=6))).run_dir
    exported = CliRunner().invoke(app, ["export", str(run_dir), "--merge", "--out", str(tmp_path / "merged")])
    assert exported.exit_code == 0, exported.output
    model, tokenizer, _ = load_run(run_dir)  # the adapter on the base quantized as it trained
    run_logits = _logits(model, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    torch.testing.assert_close(_logits(merged, tokenizer), run_logits, rtol=0, atol=1e-4)
    # Merged into the 16-bit base as stored (no rounding to the quantized grid), the logits move well past that.
    from peft import PeftModel

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / BASE_MODEL_DIR,
                                                                           dtype=torch.float32), run_dir)
    assert (_logits(plain.merge_and_unload(), tokenizer) - run_logits).abs().max() > 1e-2


def test_8bit_bases_need_cuda_and_say_so(tmp_path, tiny_data):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine trains 8-bit bases (tests/recipes/test_qlora.py::test_8bit_base_on_cuda)")
    path = qlora_config(tmp_path, tiny_data, {**QLORA, "qlora": {"bits": 8}}, max_steps=1)
    with pytest.raises(DsftError, match="method.qlora.bits: 8 needs CUDA"):
        run_sft(load_config(path))


@pytest.mark.gpu
def test_8bit_base_on_cuda(tmp_path, tiny_data):
    """LLM.int8 base: trains, and its merged export (int8 weights dequantized, update added) stays close to the run,
    whose layers also quantize their activations (so closeness, not equality)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    method = {**QLORA, "qlora": {"bits": 8}}
    run_dir = run_sft(load_config(qlora_config(tmp_path, tiny_data, method, max_steps=6))).run_dir
    exported = CliRunner().invoke(app, ["export", str(run_dir), "--merge", "--out", str(tmp_path / "merged")])
    assert exported.exit_code == 0, exported.output
    model, tokenizer, _ = load_run(run_dir)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).to(model.device)
    ids = tokenizer("把 424 米换算成厘米。", return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        gap = (merged(ids).logits.float() - model.eval()(ids).logits.float()).abs().max().item()
    assert gap < 0.1, gap
