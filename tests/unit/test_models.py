"""Presets, dtype resolution, tokenizer training and the training methods."""

import pytest
import torch

from dsft.config import FreezeConfig, LoraConfig, MethodConfig
from dsft.errors import DsftError
from dsft.models.load import resolve_dtype
from dsft.models.method import apply_method, count_parameters
from dsft.models.presets import build_preset
from dsft.data.tokenizer import ASSISTANT, BOS, EOS, PAD, THINK_CLOSE, USER, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"Convert {n} km to m. 把 {n} 千克换算成克。{n * 1000}" for n in range(200)]
    return train_bpe_tokenizer(texts, 400)


def test_trained_tokenizer_has_deepseek_chat_tokens_and_splits_digits(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    ids = tokenizer(f"{USER}12345{ASSISTANT}{THINK_CLOSE}", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [USER, "1", "2", "3", "4", "5", ASSISTANT, THINK_CLOSE]
    assert tokenizer.decode(tokenizer("把 37 千克", add_special_tokens=False)["input_ids"]) == "把 37 千克"


def test_tiny_deepseek_v3_is_a_real_mla_moe_model(tokenizer):
    model = build_preset("tiny-deepseek-v3", tokenizer, seed=0, dtype=torch.float32)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    config = model.config
    assert config.q_lora_rank and config.kv_lora_rank and config.n_shared_experts == 1 and config.n_routed_experts == 8
    names = {name for name, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in names
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "model.layers.1.mlp.shared_experts.up_proj.weight" in names
    assert 1_000_000 <= count_parameters(model).total <= 10_000_000
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)


def test_tiny_deepseek_v2_has_the_v2_lite_layout(tokenizer):
    model = build_preset("tiny-deepseek-v2", tokenizer, seed=0, dtype=torch.float32)
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    config = model.config
    assert config.q_lora_rank is None and config.topk_method == "greedy" and config.n_shared_experts == 2
    names = {name for name, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.self_attn.kv_b_proj.weight" in names
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.experts.gate_up_proj" not in names


@pytest.mark.parametrize(("preset", "architecture"), [("tiny-qwen2", "Qwen2ForCausalLM"), ("tiny-llama", "LlamaForCausalLM")])
def test_dense_presets(tokenizer, preset, architecture):
    model = build_preset(preset, tokenizer, seed=0, dtype=torch.float32)
    assert type(model).__name__ == architecture
    assert 500_000 <= count_parameters(model).total <= 10_000_000


def test_presets_are_seeded(tokenizer):
    first = build_preset("tiny-llama", tokenizer, seed=3, dtype=torch.float32)
    second = build_preset("tiny-llama", tokenizer, seed=3, dtype=torch.float32)
    assert torch.equal(first.lm_head.weight, second.lm_head.weight)


def test_auto_dtype_is_float32_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectation")
    assert resolve_dtype("auto") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16


def test_freeze_counts(tokenizer):
    model = build_preset("tiny-llama", tokenizer, seed=0, dtype=torch.float32)
    total = count_parameters(model).total
    apply_method(model, MethodConfig(type="freeze", freeze=FreezeConfig(trainable_layers=1)))
    layer = sum(p.numel() for p in model.model.layers[3].parameters())
    expected = layer + model.lm_head.weight.numel() + model.model.norm.weight.numel()
    assert count_parameters(model) == type(count_parameters(model))(expected, total)


def test_freeze_more_layers_than_the_model_has(tokenizer):
    model = build_preset("tiny-llama", tokenizer, seed=0, dtype=torch.float32)
    with pytest.raises(DsftError, match="trainable_layers: 9 but the model has 4 layers"):
        apply_method(model, MethodConfig(type="freeze", freeze=FreezeConfig(trainable_layers=9)))


def test_lora_on_named_mla_modules_counts_exactly(tokenizer):
    model = build_preset("tiny-deepseek-v3", tokenizer, seed=0, dtype=torch.float32)
    targets = ["q_a_proj", "kv_b_proj"]
    peft_model = apply_method(model, MethodConfig(type="lora", lora=LoraConfig(r=4, target_modules=targets)))
    layers = peft_model.base_model.model.model.layers
    expected = sum(4 * (getattr(layer.self_attn, n).in_features + getattr(layer.self_attn, n).out_features)
                   for layer in layers for n in targets)
    assert count_parameters(peft_model).trainable == expected


def test_unknown_lora_target_lists_the_model_linear_modules(tokenizer):
    model = build_preset("tiny-llama", tokenizer, seed=0, dtype=torch.float32)
    with pytest.raises(DsftError, match=r"method.lora.target_modules: .*linear modules of this model: down_proj, gate_proj"):
        apply_method(model, MethodConfig(type="lora", lora=LoraConfig(target_modules=["q_a_proj"])))


def test_lora_dropout_on_fused_experts_is_a_clear_error(tokenizer):
    model = build_preset("tiny-deepseek-v3", tokenizer, seed=0, dtype=torch.float32)
    with pytest.raises(DsftError, match="method.lora.dropout: must be 0"):
        apply_method(model, MethodConfig(type="lora", lora=LoraConfig(dropout=0.1)))
