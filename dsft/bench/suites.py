"""What `dsft bench` runs: suites of setups (model shape, method, lengths, steps) and their synthetic data.

The h100 suite is the issue's four setups with published shapes (random-init weights, no hub): (a) R1-Distill-Qwen-1.5B
LoRA, (b) the same in full, (c) R1-Distill-Qwen-7B LoRA at 4k tokens, (d) DeepSeek-V2-Lite LoRA on attention and
routed experts. The tiny suite is the same code path on shapes a CPU trains in seconds.
"""

from __future__ import annotations

import dataclasses
import math

from dsft.models.shapes import PUBLISHED_SHAPES

TINY_SHAPES = {
    "tiny-qwen2": {
        "architecture": "Qwen2ForCausalLM", "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 1024, "tie_word_embeddings": False},
    "tiny-deepseek-v2": {
        "architecture": "DeepseekV2ForCausalLM", "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "kv_lora_rank": 32, "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "max_position_embeddings": 1024,
        "tie_word_embeddings": False},
}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One model and method, trained by every recipe on the same data for the same steps."""

    name: str
    shape_name: str
    shape: dict
    method: str
    """lora or full."""
    mean_tokens: int
    """Mean sample length of the log-normal length distribution."""
    max_tokens: int
    """Longest sample; also the packed row budget of B1 and dsft (a row holds what a padded batch of 4 holds)."""
    warmup_steps: int
    measured_steps: int
    lora_rank: int = 16
    gradient_checkpointing: bool = False
    """For every recipe: where B0's padded batch would not fit on an 80 GB GPU without it."""
    dsft_train: tuple = ()
    """Extra train settings of the dsft recipe, as (key, value) pairs."""
    row_tokens: int | None = None
    """Tokens per packed row of B1 and dsft (None: max_tokens, what a padded batch of 4 holds). Larger rows give the
    GPU bigger matmuls per step; B0 then accumulates b0_accumulation padded batches, so every recipe's optimizer step
    still holds about the same samples and the gate compares like with like."""

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.measured_steps

    @property
    def packed_row_tokens(self) -> int:
        return self.row_tokens or self.max_tokens

    @property
    def b0_accumulation(self) -> int:
        """Padded batches B0 accumulates per optimizer step: one per max_tokens of a packed row."""
        return max(1, round(self.packed_row_tokens / self.max_tokens))


def suite_setups(suite: str) -> list[Setup]:
    """The setups of suite tiny or h100; raises ValueError for another name."""
    if suite == "tiny":
        # The chunked loss is forced on: auto keeps the model's own loss on CPU, and the test must run the GPU path.
        forced = (("chunked_loss", "on"), ("loss_chunk_tokens", 64))
        return [
            Setup("a-tiny-lora", "tiny-qwen2", TINY_SHAPES["tiny-qwen2"], "lora", 16, 64, 1, 3, 8, dsft_train=forced),
            Setup("d-tiny-moe-lora", "tiny-deepseek-v2", TINY_SHAPES["tiny-deepseek-v2"], "lora", 16, 64, 1, 3, 8,
                  gradient_checkpointing=True, dsft_train=forced),
        ]
    if suite == "h100":
        qwen_small = PUBLISHED_SHAPES["deepseek-r1-distill-qwen-1.5b"]
        qwen_large = PUBLISHED_SHAPES["deepseek-r1-distill-qwen-7b"]
        return [
            Setup("a-qwen-1.5b-lora", "deepseek-r1-distill-qwen-1.5b", qwen_small, "lora", 500, 2048, 3, 10),
            Setup("b-qwen-1.5b-full", "deepseek-r1-distill-qwen-1.5b", qwen_small, "full", 500, 2048, 3, 10),
            # 4 padded samples of up to 4k tokens with full logits and activations exceed 80 GB without checkpointing;
            # a mean of 1000 keeps a packed row of 4096 tokens about a padded batch of 4, as in the other setups.
            Setup("c-qwen-7b-lora-4k", "deepseek-r1-distill-qwen-7b", qwen_large, "lora", 1000, 4096, 3, 10,
                  gradient_checkpointing=True),
            # PEFT's adapted expert stacks (1.1 GB a layer in bf16) are kept for the backward in B0 and B1.
            Setup("d-v2-lite-lora", "deepseek-v2-lite", PUBLISHED_SHAPES["deepseek-v2-lite"], "lora", 500, 2048, 3, 10,
                  gradient_checkpointing=True),
        ]
    raise ValueError(f"unknown suite {suite!r}; allowed: tiny, h100")


def synthetic_samples(setup: Setup, seed: int = 0) -> list[dict]:
    """Training samples for setup: log-normal lengths (mean setup.mean_tokens, at most max_tokens), tokens drawn from a
    Zipf distribution over the vocabulary (id 0, the padding id, never drawn) so the loss has something to learn, the
    first quarter of each sample a prompt without loss. Enough for every recipe's steps."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    vocab = setup.shape["vocab_size"]
    zipf_V = 1.0 / torch.arange(1, vocab, dtype=torch.float64) ** 1.1
    sigma = 0.8  # a long tail of long samples, as chat data has
    mu = math.log(setup.mean_tokens) - sigma**2 / 2
    step_tokens = max(setup.packed_row_tokens, 4 * setup.mean_tokens * setup.b0_accumulation)
    needed_tokens = (setup.steps + 2) * step_tokens * 1.5
    samples, total = [], 0
    while total < needed_tokens or len(samples) < 4 * setup.b0_accumulation * (setup.steps + 2):
        length = int(torch.empty(1).log_normal_(mu, sigma, generator=generator).clamp(8, setup.max_tokens))
        ids = (torch.multinomial(zipf_V, length, replacement=True, generator=generator) + 1).tolist()
        prompt = max(1, length // 4)
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        total += length
    return samples
