"""Per-rank sharding of an epoch (data.batches): exact micro-batches, every sample once, no empty micro-batch, and
accelerate's BatchSamplerShard dealing them without repeats."""

import pytest

from dsft.data.batches import EpochBatchSampler, epoch_micro_batches, micro_batch_sizes
from dsft.errors import DsftError


def test_remainder_of_at_least_one_sample_per_micro_batch_makes_a_last_step():
    # N=10, 2 ranks x batch 4: one full step, then 2 samples over the 2 micro-batches of a last step.
    assert epoch_micro_batches(range(10), 4, 2, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8], [9]]
    # N=13: 5 samples over 2 micro-batches, the larger first.
    assert epoch_micro_batches(range(13), 4, 2, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10], [11, 12]]


def test_a_remainder_smaller_than_the_micro_batches_joins_the_last_full_step():
    # N=9: 1 sample cannot fill 2 micro-batches; the one step grows to 5 + 4.
    assert epoch_micro_batches(range(9), 4, 2, 1) == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    # N=17, 2 steps of 8: the earlier full step is untouched, the last one takes 4+1 and 4.
    assert epoch_micro_batches(range(17), 4, 2, 1) == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                       [8, 9, 10, 11, 12], [13, 14, 15, 16]]


def test_gradient_accumulation_spreads_the_remainder_over_every_micro_batch_of_the_step():
    # 2 ranks x 2 accumulation steps x batch 2: 8 samples a step, 4 micro-batches.
    assert epoch_micro_batches(range(14), 2, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7],
                                                       [8, 9], [10, 11], [12], [13]]
    # remainder 3 < 4 micro-batches: folded, the first 3 micro-batches of the last full step take 3.
    assert epoch_micro_batches(range(11), 2, 2, 2) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    assert micro_batch_sizes(18, 2, 4) == [2, 2, 2, 2] + [3, 3, 2, 2]  # 2 left over: the second step takes them
    assert micro_batch_sizes(22, 2, 4) == [2] * 8 + [2, 2, 1, 1]  # 6 left over: a third step
    assert micro_batch_sizes(16, 2, 4) == [2] * 8


def test_fewer_samples_than_one_global_batch():
    assert epoch_micro_batches([7, 3, 5], 4, 2, 1) == [[7, 3], [5]]  # slices of the given order
    assert epoch_micro_batches(range(4), 4, 2, 2) == [[0], [1], [2], [3]]
    with pytest.raises(DsftError, match="3 samples .* fewer than the 4 micro-batches"):
        epoch_micro_batches(range(3), 4, 2, 2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("grad_accum_steps", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_every_sample_once_whole_steps_and_sizes_within_one(world_size, grad_accum_steps, batch_size):
    per_step = world_size * grad_accum_steps
    for num_samples in range(per_step, 60):
        order = [(i * 7) % num_samples for i in range(num_samples)] if num_samples % 7 else list(range(num_samples))
        batches = epoch_micro_batches(order, batch_size, world_size, grad_accum_steps)
        assert [i for batch in batches for i in batch] == order  # consecutive slices: each sample once, in order
        assert len(batches) % per_step == 0
        for step in range(len(batches) // per_step):
            sizes = [len(b) for b in batches[step * per_step:(step + 1) * per_step]]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and max(sizes) <= batch_size + 1


def test_accelerate_deals_the_micro_batches_round_robin_without_repeats():
    from accelerate.data_loader import BatchSamplerShard

    sampler = EpochBatchSampler(list(range(10)), 4, world_size=2, grad_accum_steps=1)
    assert len(sampler) == 4
    shards = [BatchSamplerShard(sampler, num_processes=2, process_index=rank) for rank in (0, 1)]
    assert [list(shard) for shard in shards] == [[[0, 1, 2, 3], [8]], [[4, 5, 6, 7], [9]]]
    assert [len(shard) for shard in shards] == [2, 2]
    with pytest.raises(DsftError, match="3 samples"):
        EpochBatchSampler(list(range(3)), 4, world_size=2, grad_accum_steps=2)  # before the first batch is drawn


def test_accelerate_even_batches_repeat_samples_with_a_fixed_batch_size():
    """Why EpochBatchSampler exists: the same 10 samples in fixed batches of 4, as the Trainer builds them."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    fixed = BatchSampler(range(10), batch_size=4, drop_last=False)
    dealt = [list(BatchSamplerShard(fixed, num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert dealt == [[[0, 1, 2, 3], [8, 9, 0, 1]], [[4, 5, 6, 7], [2, 3, 4, 5]]]  # 0..5 twice
