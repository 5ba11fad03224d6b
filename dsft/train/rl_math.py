"""The arithmetic of policy-gradient fine-tuning, as pure tensor functions: GAE, group-relative advantages,
the clipped PPO losses, entropy and KL estimators.

Shapes in names: B rows (completions), T completion tokens, V vocabulary, N completions of a batch.
Masks are 1 on completion tokens and 0 on padding; every mean over tokens is a masked mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_STD_EPS = 1e-4
"""Added to the standard deviation before dividing, as TRL's GRPOTrainer does (so a group of equal rewards
gives advantages of 0, not a division by zero)."""


def masked_mean(values, mask):
    """Mean of values where mask is 1 (0 when mask is all 0)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values, mask, eps: float = 1e-8):
    """values shifted to mean 0 and scaled to standard deviation 1 over the masked entries (biased variance,
    as PPO implementations whiten); padding comes out 0."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + eps) * mask


def gae(rewards_BT, values_BT, mask_BT, gamma: float, lam: float):
    """Generalized advantage estimation over right-padded completions: (advantages_BT, returns_BT).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where the value after a
    completion's last token is 0 (the episode ends there). returns = advantages + values, the value target.
    Accepts one trajectory as 1-D tensors (T) too. Padding positions come out 0.
    """
    squeeze = rewards_BT.dim() == 1
    if squeeze:
        rewards_BT, values_BT, mask_BT = rewards_BT[None], values_BT[None], mask_BT[None]
    mask_BT = mask_BT.to(rewards_BT.dtype)
    values_BT = values_BT * mask_BT
    advantages_BT = torch.zeros_like(rewards_BT)
    next_value_B = torch.zeros_like(rewards_BT[:, 0])
    next_advantage_B = torch.zeros_like(rewards_BT[:, 0])
    for t in reversed(range(rewards_BT.shape[1])):
        delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
        advantage_B = (delta_B + gamma * lam * next_advantage_B) * mask_BT[:, t]
        advantages_BT[:, t] = advantage_B
        # A padding position passes nothing back: the next real token's successor is the episode's end.
        next_value_B = values_BT[:, t] * mask_BT[:, t]
        next_advantage_B = advantage_B
    returns_BT = advantages_BT + values_BT
    if squeeze:
        return advantages_BT[0], returns_BT[0]
    return advantages_BT, returns_BT


def group_advantages(rewards_N, group_size: int, scale: str = "group", eps: float = GROUP_STD_EPS):
    """GRPO's advantage of each completion: its reward minus its group's mean, divided by a standard deviation.

    rewards_N holds consecutive groups of group_size completions of one prompt each. scale "group" divides by the
    group's standard deviation, "batch" by the whole batch's, "none" not at all (Dr. GRPO). Standard deviations
    are unbiased (Bessel's correction, n - 1) and eps is added to them: exactly TRL GRPOTrainer's formula
    (A = (r - mean_group) / (std + 1e-4)). Raises ValueError when N is not a multiple of group_size or scale is
    unknown.
    """
    if rewards_N.numel() % group_size:
        raise ValueError(f"{rewards_N.numel()} rewards do not split into groups of {group_size}")
    grouped_GK = rewards_N.float().view(-1, group_size)
    centered_N = (grouped_GK - grouped_GK.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centered_N
    if scale == "group":
        std_N = grouped_GK.std(dim=1, unbiased=True).repeat_interleave(group_size)
    elif scale == "batch":
        std_N = rewards_N.float().std(unbiased=True).expand_as(centered_N)
    else:
        raise ValueError(f"unknown scale {scale!r}; allowed: group, batch, none")
    return centered_N / (std_N + eps)


def logprobs_and_entropy(logits_BTV, tokens_BT):
    """Log-probability of each chosen token and the entropy of each next-token distribution, in float32."""
    logprobs_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    chosen_BT = logprobs_BTV.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)
    entropy_BT = -(logprobs_BTV.exp() * logprobs_BTV).sum(-1)
    return chosen_BT, entropy_BT


def kl_k3(logprobs_BT, ref_logprobs_BT):
    """Per-token KL(policy || reference) estimate exp(ref - logp) - (ref - logp) - 1 of DeepSeekMath's GRPO
    (always >= 0, unbiased for samples from the policy)."""
    log_ratio_BT = ref_logprobs_BT - logprobs_BT
    return torch.exp(log_ratio_BT) - log_ratio_BT - 1


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    """-mean(min(ratio * A, clip(ratio) * A)) over completion tokens."""
    clip_fraction: float
    """Share of tokens whose clipped term was the smaller one (the update was cut there)."""
    approx_kl: float
    """mean(((ratio - 1) - log ratio)) to the rollout policy: how far the update moved it."""


def clipped_policy_loss(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, clip_range: float) -> PolicyLoss:
    """PPO's clipped surrogate objective, as a loss to minimize, with its clip fraction and the KL to the
    policy that sampled the rollout."""
    log_ratio_BT = logprobs_BT - old_logprobs_BT
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped_BT, clipped_BT), mask_BT)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_BT > unclipped_BT).float(), mask_BT).item()
        approx_kl = masked_mean((ratio_BT - 1) - log_ratio_BT, mask_BT).item()
    return PolicyLoss(loss, clip_fraction, approx_kl)


@dataclass
class ValueLoss:
    loss: torch.Tensor
    """0.5 * mean(max((V - R)^2, (V_clipped - R)^2)) over completion tokens."""
    clip_fraction: float
    """Share of tokens whose clipped error was the larger one."""


def clipped_value_loss(values_BT, old_values_BT, returns_BT, mask_BT, clip_range: float) -> ValueLoss:
    """PPO's value loss: the new prediction may move at most clip_range from the rollout's, else the larger
    (pessimistic) of the two squared errors counts."""
    clipped_values_BT = old_values_BT + torch.clamp(values_BT - old_values_BT, -clip_range, clip_range)
    error_BT = (values_BT - returns_BT) ** 2
    clipped_error_BT = (clipped_values_BT - returns_BT) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error_BT, clipped_error_BT), mask_BT)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error_BT > error_BT).float(), mask_BT).item()
    return ValueLoss(loss, clip_fraction)


def token_rewards(scores_B, logprobs_BT, ref_logprobs_BT, mask_BT, kl_coef: float):
    """Per-token rewards of PPO for language models: -kl_coef * (logp - ref_logp) at every completion token,
    plus the completion's score at its last token. Returns (rewards_BT, kl_BT) where kl_BT is the per-token
    estimate logp - ref_logp (masked)."""
    mask_BT = mask_BT.to(logprobs_BT.dtype)
    kl_BT = (logprobs_BT - ref_logprobs_BT) * mask_BT
    rewards_BT = -kl_coef * kl_BT
    last_B = (mask_BT.sum(1).long() - 1).clamp(min=0)
    rows_B = torch.arange(rewards_BT.shape[0], device=rewards_BT.device)
    rewards_BT[rows_B, last_B] += scores_B.to(rewards_BT.dtype) * (mask_BT.sum(1) > 0)
    return rewards_BT, kl_BT
