"""Tiny random-init models of the DeepSeek architectures, built from config with no download.

tiny-deepseek-v3 is a real DeepseekV3ForCausalLM (MLA attention with q/kv low-rank projections,
MoE with shared and routed experts after one dense layer); tiny-deepseek-v2 is DeepseekV2ForCausalLM in
DeepSeek-V2-Lite's layout (no query low-rank, two shared experts, greedy routing); tiny-qwen2 and
tiny-llama are the dense architectures of DeepSeek-R1-Distill-Qwen and deepseek-llm / deepseek-coder.
All are about 1-3 M parameters with a small vocabulary, so they train on 2 CPU cores in seconds.
"""

from __future__ import annotations

from dsft.errors import DsftError

_DENSE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)

_DEEPSEEK_V3 = dict(
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=32,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)

# DeepSeek-V2-Lite's layout at the same small size: no query low-rank, two shared experts, greedy top-k routing.
_DEEPSEEK_V2_LITE = {**_DEEPSEEK_V3, "n_shared_experts": 2, "q_lora_rank": None, "topk_method": "greedy",
                     "norm_topk_prob": False}
PRESETS = ("tiny-deepseek-v3", "tiny-deepseek-v2", "tiny-qwen2", "tiny-llama")


def preset_config(name: str, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    """The transformers config of a preset, sized to the tokenizer's vocabulary."""
    from transformers import DeepseekV2Config, DeepseekV3Config, LlamaConfig, Qwen2Config

    token_ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    # A vocabulary rounded up to a multiple of 64 keeps the embedding matmuls aligned.
    vocab_size = -(-vocab_size // 64) * 64
    if name == "tiny-deepseek-v3":
        return DeepseekV3Config(vocab_size=vocab_size, **_DEEPSEEK_V3, **token_ids)
    if name == "tiny-deepseek-v2":
        return DeepseekV2Config(vocab_size=vocab_size, **_DEEPSEEK_V2_LITE, **token_ids)
    if name == "tiny-qwen2":
        return Qwen2Config(vocab_size=vocab_size, **_DENSE, **token_ids)
    if name == "tiny-llama":
        return LlamaConfig(vocab_size=vocab_size, **_DENSE, **token_ids)
    raise DsftError(f"model.preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")


def build_preset(name: str, tokenizer, seed: int, dtype):
    """A random-init model of the preset architecture (seeded, so runs are reproducible)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = preset_config(name, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_preset_classifier(name: str, tokenizer, seed: int, dtype, labels: list[str], task: str = "classification"):
    """A random-init *ForSequenceClassification (task classification) or *ForTokenClassification (task
    token_classification) of the preset architecture with one output per label."""
    import torch

    from dsft.models.auto import auto_model_class

    config = preset_config(name, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(seed)
    return auto_model_class(task).from_config(config, dtype=dtype)
