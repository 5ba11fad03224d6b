"""LoRA on fused MoE experts as grouped low-rank products: a transformers experts implementation, "dsft_grouped_mm".

PEFT adapts a fused expert weight W [experts, out, in] (LoRA target_parameters) by parametrizing it as
W + scaling * lhs @ rhs for the duration of each forward. transformers' experts kernels then read the adapted
stack: it is formed whole (one baddbmm), kept for the backward, and since it depends on the trainable factors its
full-size gradient is formed too, one weight-gradient GEMM per expert: the cost of fine-tuning the experts in full.

"dsft_grouped_mm" reads the factors PEFT put in place and never reads the adapted stack: the tokens routed to each
expert go through x @ W.T + scaling * (x @ rhs.T) @ lhs.T, three grouped GEMMs (the low-rank pair is of rank r),
so the backward forms gradients for the factors and the routed activations only, and W stays frozen.

One transient copy of the stack remains per forward: torch's register_parametrization, which PEFT calls with
unsafe=False, evaluates the parametrization once as a shape check. It is freed at once and has no gradient;
removing it needs PEFT to register with unsafe=True.

Without a single-adapter factor parametrization (no LoRA on the experts, several adapters, biased or
expert-parallel experts) it is exactly transformers' grouped_mm. It is registered in transformers'
ExpertsInterface, the library's extension point for experts kernels, and chosen per model with
set_experts_implementation (kernels.py); the name is never saved: config.json keeps no experts implementation.
"""

from __future__ import annotations

import torch

GROUPED_LORA = "dsft_grouped_mm"
"""The experts implementation name dsft registers for train.experts: grouped_mm."""


def register_grouped_lora() -> str:
    """Register dsft_grouped_mm in transformers' experts interface (idempotent); returns its name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if GROUPED_LORA not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(GROUPED_LORA, grouped_lora_experts_forward)
    return GROUPED_LORA


def grouped_lora_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The experts forward of transformers' interface: hidden_states [tokens, hidden], top_k_index and top_k_weights
    [tokens, k]; returns [tokens, hidden], the routing-weighted sum of each token's k experts."""
    if self.has_bias or self.has_post_expert_norm or self._is_expert_parallel or not self.has_gate:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.shape[-1]
    # S = tokens x k (token, expert) pairs, sorted by expert so each expert's rows are contiguous.
    expert_ids_S, order_S = torch.sort(top_k_index.reshape(-1))
    routed_SD = hidden_states[order_S // top_k]
    # histc, as transformers does: no device sync, and CUDA graphs allow it (float input on CPU, int on CUDA).
    ids = expert_ids_S.int() if hidden_states.device.type == "cuda" else expert_ids_S.float()
    tokens_per_expert_E = torch.histc(ids, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets_E = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)
    gate_up_SI = _adapted_linear(self, "gate_up_proj", routed_SD, offsets_E)
    out_SD = _adapted_linear(self, "down_proj", self._apply_gate(gate_up_SI), offsets_E)
    weighted_SD = out_SD * top_k_weights.reshape(-1)[order_S].unsqueeze(-1)
    unsorted_SD = weighted_SD[torch.argsort(order_S)]
    return unsorted_SD.view(num_tokens, top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _adapted_linear(experts, name: str, x_SK, offsets_E):
    """x through experts.<name> per expert group, with its LoRA update as a low-rank pair when PEFT adapts it."""
    weight, factors = lora_factors(experts, name)
    out_SN = _grouped_linear(x_SK, weight, offsets_E, experts.is_transposed)
    if factors is None:
        return out_SN
    lhs, rhs, scaling = factors
    # The adapted weight is W + scaling * lhs @ rhs, stored [in, out] when transposed, else [out, in].
    first, second = (lhs, rhs) if experts.is_transposed else (rhs, lhs)
    low_rank_SR = _grouped_linear(x_SK, first, offsets_E, experts.is_transposed)
    return out_SN + scaling * _grouped_linear(low_rank_SR, second, offsets_E, experts.is_transposed)


def lora_factors(experts, name: str):
    """(W, (lhs, rhs, scaling)) while PEFT parametrizes experts.<name> with one adapter's low-rank factors; else
    (the weight as the forward would read it, None)."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(experts, name):
        return getattr(experts, name), None
    chain = experts.parametrizations[name]
    proxy = chain[0] if len(chain) == 1 else None
    if proxy is None or not all(hasattr(proxy, attr) for attr in ("lhs", "rhs", "scaling")):
        return getattr(experts, name), None  # several adapters or a float8 base: PEFT forms the delta itself
    # PEFT's factors are permuted views; a grouped GEMM needs one of the last two dimensions contiguous.
    return chain.original, (proxy.lhs.contiguous(), proxy.rhs.contiguous(), proxy.scaling)


def _grouped_linear(x_SK, weight, offsets_E, is_transposed: bool):
    """Rows of x_SK times their expert's weight (stored [experts, K, N] when is_transposed, else [experts, N, K])."""
    from transformers.integrations.moe import _grouped_mm  # also registers the fallback op below

    weight_EKN = weight if is_transposed else weight.transpose(-2, -1)
    out_row_bytes = weight_EKN.shape[-1] * weight_EKN.element_size()  # the output's gradient has this row stride
    if _aligned(x_SK) and _aligned(weight_EKN) and out_row_bytes % 16 == 0:
        return _grouped_mm(x_SK, weight_EKN, offs=offsets_E)
    # torch's grouped GEMM needs 16-byte strides (a LoRA rank of 4 in bf16 has 8): transformers' per-expert loop.
    return torch.ops.transformers.grouped_mm_fallback(x_SK.to(weight_EKN.dtype), weight_EKN, offs=offsets_E)


def _aligned(tensor) -> bool:
    size = tensor.element_size()
    return 1 in tensor.stride()[-2:] and tensor.data_ptr() % 16 == 0 and all(
        stride * size % 16 == 0 for stride, extent in zip(tensor.stride(), tensor.shape) if stride != 1 and extent > 1
    )
