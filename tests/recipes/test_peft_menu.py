"""The PEFT menu through the real stage: DoRA, rsLoRA, PiSSA and OLoRA initialisation, LoRA+, rank and alpha
patterns, prefix tuning, prompt tuning and IA3 each train (the loss falls), save an adapter that plain PEFT loads
with the logits of the trained model, and the LoRA family's export --merge computes the same; what PEFT cannot
train on DeepSeek's MoE and latent attention is refused before anything trains."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM

from dsft.config import load_config
from dsft.errors import DsftError
from dsft.export.export import export_run
from dsft.train.sft import run_sft

from .conftest import make_config, train_losses

LORA = {"r": 8, "alpha": 16}
VARIANTS = {
    "dora": ({"type": "lora", "lora": {**LORA, "use_dora": True}}, 3e-3),
    "rslora": ({"type": "lora", "lora": {**LORA, "use_rslora": True}}, 3e-3),
    "pissa": ({"type": "lora", "lora": {**LORA, "init": "pissa"}}, 3e-3),
    "olora": ({"type": "lora", "lora": {**LORA, "init": "olora"}}, 3e-3),
    "lora_plus": ({"type": "lora", "lora": {**LORA, "plus_lr_ratio": 16}}, 3e-4),
    "patterns": ({"type": "lora", "lora": {**LORA, "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"down_proj": 4}}},
                 3e-3),
    "prefix": ({"type": "prefix", "prefix": {"kind": "prefix", "num_virtual_tokens": 8}}, 3e-2),
    "prompt": ({"type": "prefix", "prefix": {"kind": "prompt", "num_virtual_tokens": 8}}, 3e-2),
    "ia3": ({"type": "ia3", "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"],
                                    "feedforward_modules": ["down_proj"]}}, 3e-2),
}
PEFT_TYPES = {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING", "ia3": "IA3"}


def _logits(model, tokenizer):
    ids = tokenizer("Convert 3 kg to g.", return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_and_loads_in_plain_peft(tmp_path, tiny_data, variant):
    method, learning_rate = VARIANTS[variant]
    path = make_config(tmp_path, tiny_data, model={"preset": "tiny-qwen2"}, method=method,
                       train={"max_steps": 12, "learning_rate": learning_rate, "logging_steps": 1})
    result = run_sft(load_config(path))
    run_dir, losses = result.run_dir, train_losses(result.run_dir)
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)) - 0.1  # it trains
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter["peft_type"] == PEFT_TYPES.get(variant, "LORA")
    trained = _logits(result.model, result.tokenizer)
    plain = AutoPeftModelForCausalLM.from_pretrained(run_dir)  # the adapter names base_model/ as its base
    torch.testing.assert_close(_logits(plain, result.tokenizer), trained, rtol=0, atol=1e-5)
    if variant in ("pissa", "olora"):
        # Saved converted against the initial adapter: plain LoRA of rank 2r on the original (unchanged) base.
        assert adapter["r"] == 2 * LORA["r"] and adapter["init_lora_weights"] is True
    if variant == "dora":
        assert adapter["use_dora"] is True
    if variant in PEFT_TYPES:
        with pytest.raises(DsftError, match="export without --merge"):
            export_run(run_dir, tmp_path / "merged", merge=True)
        return
    export_run(run_dir, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(_logits(merged, result.tokenizer), trained, rtol=0, atol=1e-4)


def test_lora_plus_gives_b_its_own_learning_rate(tmp_path, tiny_data):
    from dsft.train.adapters import loraplus_optimizer
    from dsft.train.loop import training_arguments

    config = load_config(make_config(tmp_path, tiny_data, model={"preset": "tiny-qwen2"},
                                     method=VARIANTS["lora_plus"][0], train={"learning_rate": 1e-4, "max_steps": 1}))
    model = run_sft(config).model
    trainer = type("Trainer", (), {"model": model, "args": training_arguments(config.train, tmp_path, False)})()
    rates = {id(p): group["lr"] for group in loraplus_optimizer(trainer, 16).param_groups for p in group["params"]}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(rates[id(p)] == pytest.approx(1.6e-3 if "lora_B" in name else 1e-4)
                             for name, p in trainable)


@pytest.mark.parametrize("method, message", [
    ({"type": "lora", "lora": {**LORA, "use_dora": True}}, "method.lora.use_dora: PEFT's DoRA works on nn.Linear"),
    ({"type": "lora", "lora": {**LORA, "init": "pissa"}}, "method.lora.init pissa: PEFT initialises so only"),
    ({"type": "prefix", "prefix": {"kind": "prefix"}}, "method.prefix.kind prefix: deepseek_v3's multi-head latent"),
])
def test_what_peft_cannot_train_on_deepseek_moe_is_refused(tmp_path, tiny_data, method, message):
    with pytest.raises(DsftError, match=message):
        run_sft(load_config(make_config(tmp_path, tiny_data, model={"preset": "tiny-deepseek-v3"}, method=method,
                                        train={"max_steps": 1})))
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_dora_on_deepseek_attention_trains(tmp_path, tiny_data):
    method = {"type": "lora", "lora": {**LORA, "use_dora": True,
                                       "target_modules": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"]}}
    result = run_sft(load_config(make_config(tmp_path, tiny_data, model={"preset": "tiny-deepseek-v3"}, method=method,
                                             train={"max_steps": 2})))
    assert any("lora_magnitude_vector" in name for name, _ in result.model.named_parameters())


@pytest.mark.gpu
def test_loftq_fits_the_adapter_to_the_4bit_base_on_cuda(tmp_path, tiny_data):
    """LoftQ (PEFT's replace_lora_weights_loftq, CUDA only): before any step the adapter is fitted to the 4-bit base's
    quantization error (B is not the zero LoRA starts from), and the run trains."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from rich.console import Console

    from dsft.models.method import apply_method
    from dsft.train import run_dir as rd
    from dsft.train.adapters import initialise_adapter

    method = {"type": "qlora", "lora": {**LORA, "init": "loftq"}}
    config = load_config(make_config(tmp_path, tiny_data, model={"preset": "tiny-qwen2"}, method=method,
                                     train={"max_steps": 2}))
    tokenizer = run_sft(config).tokenizer  # the run trains; its tokenizer builds the same start again
    model = apply_method(rd.start_model(config, tokenizer, tmp_path / "run", Console(quiet=True)), config.method)
    assert all(p.abs().sum() == 0 for name, p in model.named_parameters() if "lora_B" in name)
    initialise_adapter(model, config, tmp_path / "run")
    assert all(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)
