"""Tiny random-init models of the DeepSeek architectures, built from config with no download.

tiny-deepseek-v3 is a real DeepseekV3ForCausalLM (MLA attention with q/kv low-rank projections,
MoE with shared and routed experts after one dense layer); tiny-deepseek-v2 is DeepseekV2ForCausalLM in
DeepSeek-V2-Lite's layout (no query low-rank, two shared experts, greedy routing); tiny-qwen2 and
tiny-llama are the dense architectures of DeepSeek-R1-Distill-Qwen and deepseek-llm / deepseek-coder.
tiny-deepseek-v32 is DeepseekV32ForCausalLM (V3 plus DeepSeek sparse attention's lightning indexer) and
tiny-deepseek-v4 DeepseekV4ForCausalLM (compressed sparse, heavily compressed and sliding-window attention,
hash-routed and top-k MoE layers, hyper-connections, grouped output projection).
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
# DeepSeek-V3.2's layout: V3's MLA and MoE, plus the lightning indexer of DeepSeek sparse attention, which keeps
# index_topk keys per query. 8 of a 40-token sample's keys is sparse enough that the indexer decides what is seen.
_DEEPSEEK_V32 = {**_DEEPSEEK_V3, "index_topk": 8, "index_head_dim": 32, "index_n_heads": 4}
# DeepSeek-V4's layout (V4-Flash's schedule, shrunk): a heavily compressed layer, then compressed sparse and
# sliding-window ones; two hash-routed MoE layers (a frozen token-to-expert table) before top-k routed ones;
# hyper-connections (hc_mult residual streams) and the grouped output projection. Windows are small (compress
# rates 4 and 16, a 16-token sliding window) so a 40-token sample exercises every branch.
_DEEPSEEK_V4 = dict(
    hidden_size=128,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    q_lora_rank=64,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention",
                 "compressed_sparse_attention"],
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    sliding_window=16,
    hc_mult=2,
    hc_sinkhorn_iters=4,
    o_groups=2,
    o_lora_rank=32,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=4,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
PRESETS = ("tiny-deepseek-v3", "tiny-deepseek-v2", "tiny-deepseek-v32", "tiny-deepseek-v4", "tiny-qwen2", "tiny-llama")


def preset_config(name: str, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    """The transformers config of a preset, sized to the tokenizer's vocabulary."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        DeepseekV4Config,
        DeepseekV32Config,
        LlamaConfig,
        Qwen2Config,
    )

    token_ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    # A vocabulary rounded up to a multiple of 64 keeps the embedding matmuls aligned.
    vocab_size = -(-vocab_size // 64) * 64
    if name == "tiny-deepseek-v3":
        return DeepseekV3Config(vocab_size=vocab_size, **_DEEPSEEK_V3, **token_ids)
    if name == "tiny-deepseek-v2":
        return DeepseekV2Config(vocab_size=vocab_size, **_DEEPSEEK_V2_LITE, **token_ids)
    if name == "tiny-deepseek-v32":
        return DeepseekV32Config(vocab_size=vocab_size, **_DEEPSEEK_V32, **token_ids)
    if name == "tiny-deepseek-v4":
        return DeepseekV4Config(vocab_size=vocab_size, **_DEEPSEEK_V4, **token_ids)
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
    return seed_hash_routes(AutoModelForCausalLM.from_config(config, dtype=dtype), seed)


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
    try:
        return seed_hash_routes(auto_model_class(task).from_config(config, dtype=dtype), seed)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise DsftError(f"model.preset: {name} has no {task} head in transformers (no {type(config).__name__[:-6]}For"
                        f"{'Sequence' if task == 'classification' else 'Token'}Classification); use task multitask, "
                        "whose heads sit on any backbone, or another preset") from None


def seed_hash_routes(model, seed: int):
    """Give each hash-routed MoE layer (DeepSeek-V4's tid2eid) a seeded token-to-expert table of distinct experts.

    transformers initialises the table to zeros (a checkpoint brings the real one), which would send every token
    to expert 0 twice; a published table spreads tokens over the experts, and so does this one. Returns model.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        if name.endswith("tid2eid"):
            vocab, top_k = buffer.shape
            experts = model.config.n_routed_experts
            table = torch.rand(vocab, experts, generator=generator).argsort(dim=1)[:, :top_k]
            buffer.copy_(table.to(buffer.dtype))
    return model
