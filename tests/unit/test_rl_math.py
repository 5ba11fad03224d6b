"""The arithmetic of GRPO and PPO on hand-computed numbers: GAE, group advantages (= TRL's formula), the clipped
losses, KL estimators, per-token rewards, whitening and the completion mask."""

import math

import pytest
import torch

from dsft.train import rl_math
from dsft.train.ppo import completion_mask


def test_gae_on_a_hand_computed_trajectory():
    # gamma 0.9, lam 0.8; the value after the last token is 0 (the episode ends).
    # t=2: delta = 1 + 0.9*0 - 0.7 = 0.3                      A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03                   A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04                   A0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    rewards = torch.tensor([0.0, 0.0, 1.0])
    values = torch.tensor([0.5, 0.6, 0.7])
    advantages, returns = rl_math.gae(rewards, values, torch.ones(3), gamma=0.9, lam=0.8)
    assert advantages.tolist() == pytest.approx([0.21712, 0.246, 0.3], abs=1e-6)
    assert returns.tolist() == pytest.approx([0.71712, 0.846, 1.0], abs=1e-6)


def test_gae_stops_at_each_completions_end_in_a_padded_batch():
    # Row 1 ends after two tokens; its padding carries a garbage value and reward that must not leak back.
    # t=1: delta = -0.1 + 0 - 0.3 = -0.4                       A1 = -0.4
    # t=0: delta = 0.2 + 0.9*0.3 - 0.1 = 0.37                  A0 = 0.37 + 0.72*(-0.4) = 0.082
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, -0.1, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.1, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = rl_math.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert advantages[0].tolist() == pytest.approx([0.21712, 0.246, 0.3], abs=1e-6)
    assert advantages[1].tolist() == pytest.approx([0.082, -0.4, 0.0], abs=1e-6)
    assert returns[1].tolist() == pytest.approx([0.182, -0.1, 0.0], abs=1e-6)


def test_gae_with_lambda_and_gamma_one_is_the_return_minus_the_value():
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.25])
    values = torch.tensor([0.1, 0.2, 0.3, 0.4])
    advantages, returns = rl_math.gae(rewards, values, torch.ones(4), gamma=1.0, lam=1.0)
    assert returns.tolist() == pytest.approx([1.75, 1.25, 2.25, 0.25])
    assert advantages.tolist() == pytest.approx([1.65, 1.05, 1.95, -0.15])


def test_group_advantages_on_a_hand_made_group():
    # Group 1: mean 0.5, unbiased std sqrt((4 x 0.25) / 3) = sqrt(1/3); group 2 is all equal: advantages 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages = rl_math.group_advantages(rewards, group_size=4, scale="group")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert advantages.tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], abs=1e-6)
    assert rl_math.group_advantages(rewards, 4, "none").tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    batch_std = rewards.std(unbiased=True).item()
    assert rl_math.group_advantages(rewards, 4, "batch").tolist() == pytest.approx(
        [x / (batch_std + 1e-4) for x in (0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0)], abs=1e-6)


def test_group_advantages_equal_trls_formula():
    # TRL's GRPOTrainer (sum_then_normalize): (r - group mean) / (nanstd(group) + 1e-4), nanstd with Bessel's
    # correction. The recipe test also checks the advantages TRL logged during a real run.
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([0.3, 0.9, 0.1, 0.7, 1.0, 0.0, 0.5, 0.5, 0.2])
    grouped = rewards.view(-1, 3)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    assert rl_math.group_advantages(rewards, 3).tolist() == pytest.approx(expected.view(-1).tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        rl_math.group_advantages(rewards, 4)


def test_clipped_policy_loss_on_hand_made_tensors():
    # Token 0: ratio 1.5, A = 1 -> min(1.5, clip 1.2) = 1.2 (clipped); token 1: ratio 0.9, A = -2 -> -1.8 (inside
    # the range); token 2 is padding. loss = -(1.2 - 1.8) / 2 = 0.3; clip fraction 1/2.
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    new = (old + torch.log(torch.tensor([[1.5, 0.9, 3.0]])))
    new.requires_grad_(True)
    advantages = torch.tensor([[1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    result = rl_math.clipped_policy_loss(new, old, advantages, mask, clip_range=0.2)
    assert result.loss.item() == pytest.approx(0.3, abs=1e-6)
    assert result.clip_fraction == 0.5
    # approx KL: mean((r - 1) - log r) over the two tokens
    assert result.approx_kl == pytest.approx(((0.5 - math.log(1.5)) + (-0.1 - math.log(0.9))) / 2, abs=1e-6)
    result.loss.backward()
    # The clipped token gets no gradient; the other d/dlogp of -A * r / 2 = 2 * 0.9 / 2.
    assert new.grad[0].tolist() == pytest.approx([0.0, 0.9, 0.0], abs=1e-6)


def test_clipped_value_loss_on_hand_made_tensors():
    # Token 0: V 1.0 moved 0.5 from 0.5, clipped to 0.7: max((1 - 2)^2, (0.7 - 2)^2) = 1.69 (clipped counts);
    # token 1: V 0.0 within 0.1 +- 0.2: (0 + 1)^2 = 1. loss = 0.5 x (1.69 + 1) / 2 = 0.6725.
    values = torch.tensor([[1.0, 0.0, 4.0]])
    old = torch.tensor([[0.5, 0.1, 0.0]])
    returns = torch.tensor([[2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    result = rl_math.clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    assert result.loss.item() == pytest.approx(0.6725, abs=1e-6)
    assert result.clip_fraction == 0.5


def test_token_rewards_subtract_the_kl_and_add_the_score_at_the_last_token():
    # kl = logp - ref = [0.5, -1.0, (pad)]; rewards = -0.1 x kl, plus the score 1.0 at the last real token.
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    rewards, kl = rl_math.token_rewards(torch.tensor([1.0]), logprobs, ref, torch.tensor([[1, 1, 0]]), kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([-0.05, 1.1, 0.0])
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0])


def test_kl_k3_entropy_and_whitening():
    # exp(-0.5) - (-0.5) - 1 for ref - logp = -0.5; zero where the two agree.
    assert rl_math.kl_k3(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])).tolist() == pytest.approx(
        [math.exp(-0.5) - 0.5, 0.0], abs=1e-6)
    logprobs, entropy = rl_math.logprobs_and_entropy(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]))
    assert logprobs[0].tolist() == pytest.approx([math.log(0.25)] * 2)
    assert entropy[0].tolist() == pytest.approx([math.log(4)] * 2)
    whitened = rl_math.masked_whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert whitened.tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0], abs=1e-5)


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    eos = 2
    completion = torch.tensor([[5, 6, 2, 7], [2, 9, 9, 9], [5, 5, 5, 5]])
    assert completion_mask(completion, eos).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
