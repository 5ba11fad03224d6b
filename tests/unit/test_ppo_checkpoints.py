"""PPO checkpoint helpers: RNG states survive a torch.save / weights_only load exactly."""

import random

import numpy as np
import torch

from dsft.train.ppo_checkpoints import _as_tuples, restore_rng_state, rng_state


def test_rng_state_round_trip_draws_the_same_numbers(tmp_path):
    sampler = torch.Generator().manual_seed(3)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    torch.save(rng_state(sampler), tmp_path / "rng.pt")
    expected = (torch.rand(3).tolist(), random.random(), np.random.rand(),
                torch.randperm(5, generator=sampler).tolist())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), sampler)
    got = (torch.rand(3).tolist(), random.random(), np.random.rand(), torch.randperm(5, generator=sampler).tolist())
    assert got == expected


def test_as_tuples_turns_nested_lists_back_into_tuples():
    assert _as_tuples([3, [1, 2], None]) == (3, (1, 2), None)
