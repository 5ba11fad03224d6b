"""Published architecture shapes of DeepSeek models (config.json hyper-parameters, no weights), for `dsft bench`
(random-init models of the real size) and `dsft plan` (memory before any weight exists).

The V2/V3 and R1-Distill entries are the models' config.json fields (../shared/arch_shapes.json; a test keeps them
equal). DeepSeek-V3.2 is V3's layout plus the lightning indexer (64 heads of 128, 2048 keys per query), and
DeepSeek-V4-Flash is transformers' DeepseekV4Config defaults, which its documentation gives as V4-Flash's
(284 B parameters: hidden 4096, 43 layers, 64 query heads of 512 sharing one KV head, 256 routed experts, 6 per
token, grouped output projection of 8 groups, 4 hyper-connection streams).
"""

from __future__ import annotations

_V3 = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": 8,
    "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "topk_method": "noaux_tc",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "tie_word_embeddings": False}

PUBLISHED_SHAPES = {
    "deepseek-r1-distill-qwen-1.5b": {
        "architecture": "Qwen2ForCausalLM", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rope_theta": 10000, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False},
    "deepseek-r1-distill-qwen-7b": {
        "architecture": "Qwen2ForCausalLM", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rope_theta": 10000, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False},
    "deepseek-v2-lite": {
        "architecture": "DeepseekV2ForCausalLM", "vocab_size": 102400, "hidden_size": 2048,
        "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy", "n_group": 1,
        "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False, "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False},
    "deepseek-v3": {"architecture": "DeepseekV3ForCausalLM", **_V3},
    # topk_method is V3's config.json field; DeepseekV32Config routes noaux_tc without one.
    "deepseek-v3.2": {"architecture": "DeepseekV32ForCausalLM", **{k: v for k, v in _V3.items() if k != "topk_method"},
                      "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048},
    "deepseek-v4-flash": {
        "architecture": "DeepseekV4ForCausalLM", "vocab_size": 129280, "hidden_size": 4096,
        "moe_intermediate_size": 2048, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
        "head_dim": 512, "q_lora_rank": 1024, "num_experts_per_tok": 6, "n_routed_experts": 256,
        "n_shared_experts": 1, "routed_scaling_factor": 1.5, "o_groups": 8, "o_lora_rank": 1024, "hc_mult": 4,
        "sliding_window": 128, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
        "max_position_embeddings": 1048576, "rms_norm_eps": 1e-06, "tie_word_embeddings": False},
}

HUB_IDS = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "deepseek-r1-distill-qwen-1.5b",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": "deepseek-r1-distill-qwen-7b",
    "deepseek-ai/DeepSeek-V2-Lite": "deepseek-v2-lite",
    "deepseek-ai/DeepSeek-V2-Lite-Chat": "deepseek-v2-lite",
    "deepseek-ai/DeepSeek-V3": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3-Base": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3-0324": "deepseek-v3",
    "deepseek-ai/DeepSeek-R1": "deepseek-v3",
    "deepseek-ai/DeepSeek-R1-0528": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3.1": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3.1-Terminus": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3.2-Exp": "deepseek-v3.2",
    "deepseek-ai/DeepSeek-V3.2": "deepseek-v3.2",
    "deepseek-ai/DeepSeek-V4-Flash": "deepseek-v4-flash",
    "deepseek-ai/DeepSeek-V4-Flash-Base": "deepseek-v4-flash",
}
"""Hub ids whose architecture is a published shape (the same layout; V3.1 and R1 are V3's)."""

MODEL_TYPES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "DeepseekV2ForCausalLM": "deepseek_v2",
               "DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV32ForCausalLM": "deepseek_v32",
               "DeepseekV4ForCausalLM": "deepseek_v4"}
"""transformers model_type of each architecture a shape may name."""


def shape_config(shape: dict, **overrides):
    """The transformers config of shape (an entry of PUBLISHED_SHAPES or one like it), with overrides."""
    from transformers import AutoConfig

    fields = {key: value for key, value in shape.items() if key != "architecture"}
    return AutoConfig.for_model(MODEL_TYPES[shape["architecture"]], **{**fields, **overrides})


def published_shape(name_or_path: str) -> dict | None:
    """The published shape of a hub id (HUB_IDS) or a shape name (PUBLISHED_SHAPES); None for any other model."""
    name = HUB_IDS.get(name_or_path, name_or_path)
    return PUBLISHED_SHAPES.get(name)

