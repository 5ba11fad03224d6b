"""One epoch's micro-batches for data-parallel training: every sample exactly once, every rank the same number of
micro-batches in every optimizer step.

accelerate shards a loader by dealing the batches of one batch sampler round-robin: micro-batch k goes to rank
k % world_size (BatchSamplerShard). With fixed-size batches, an epoch that does not divide into global batches
(batch_size x world_size x grad_accum_steps) ends short, and accelerate's even_batches fills it with samples from
the start of the epoch: those samples are trained on twice. Here the epoch is cut so that it needs no filling.

The rule, for N samples in the epoch's order, M = world_size x grad_accum_steps micro-batches per optimizer step
and S = batch_size x M samples per full step, with N = full_steps x S + R (0 <= R < S):

- every full step: M micro-batches of batch_size consecutive samples;
- R >= M: one more step, whose M micro-batches share the R samples as evenly as possible (sizes R // M, the first
  R % M of them one larger);
- 0 < R < M (some micro-batch of a last step would be empty): the R samples join the last full step, whose first
  R micro-batches take batch_size + 1 samples. A micro-batch then holds one sample more than train.batch_size
  (with packing: one packed row more) -- the price of training on every sample once without an empty micro-batch;
- N < M: no step can give every micro-batch a sample; DsftError.

Micro-batches take consecutive slices of the order, so optimizer step s trains on the same samples as one process
with batch_size x world_size per micro-batch (the same global batches), whatever the sizes within the step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from dsft.errors import DsftError


def micro_batch_sizes(num_samples: int, batch_size: int, micro_batches_per_step: int) -> list[int]:
    """Sizes of one epoch's micro-batches in the order they are dealt (see the module docstring for the rule).

    Raises DsftError when num_samples is smaller than micro_batches_per_step (world size x accumulation steps)."""
    samples_per_step = batch_size * micro_batches_per_step
    full_steps, remainder_samples = divmod(num_samples, samples_per_step)
    full = [batch_size] * (full_steps * micro_batches_per_step)
    if remainder_samples == 0:
        return full
    if remainder_samples >= micro_batches_per_step:
        return full + _spread(remainder_samples, micro_batches_per_step)
    if full_steps == 0:
        raise DsftError(
            f"the training set has {num_samples} samples (rows), fewer than the {micro_batches_per_step} "
            "micro-batches of one optimizer step (world size x train.grad_accum_steps): every rank needs a sample "
            "in each of its micro-batches; add data or lower --nproc or train.grad_accum_steps")
    return full[:-micro_batches_per_step] + _spread(samples_per_step + remainder_samples, micro_batches_per_step)


def _spread(num_samples: int, parts: int) -> list[int]:
    """num_samples in parts as even as possible, the larger parts first: _spread(7, 3) == [3, 2, 2]."""
    smaller, larger_parts = divmod(num_samples, parts)
    return [smaller + 1] * larger_parts + [smaller] * (parts - larger_parts)


def epoch_micro_batches(order: Sequence[int], batch_size: int, world_size: int,
                        grad_accum_steps: int) -> list[list[int]]:
    """The epoch's order cut into micro-batches of micro_batch_sizes, consecutive slices in dealing order:
    micro-batch k is for rank k % world_size. Raises DsftError as micro_batch_sizes does."""
    batches, start = [], 0
    for size in micro_batch_sizes(len(order), batch_size, world_size * grad_accum_steps):
        batches.append(list(order[start:start + size]))
        start += size
    return batches


class EpochBatchSampler(Sampler[list[int]]):
    """A batch sampler for accelerate's BatchSamplerShard: each pass over `sampler` (the epoch's order, e.g. the
    Trainer's shuffled one) cut by epoch_micro_batches.

    Raises DsftError at construction when the data cannot fill one step (see micro_batch_sizes)."""

    batch_size = None
    """None on purpose: BatchSamplerShard holds back a round of micro-batches whose last one is shorter than a
    numeric batch_size (and refills from the epoch's start); with None it deals micro-batches of any size."""
    drop_last = False

    def __init__(self, sampler: Sampler[int], micro_batch_size: int, world_size: int, grad_accum_steps: int):
        self.sampler = sampler
        """Read and replaced by accelerate (its seedable sampler, whose epoch it sets), as on a torch BatchSampler."""
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.grad_accum_steps = grad_accum_steps
        len(self)  # fail now, not at the first batch

    def __iter__(self) -> Iterator[list[int]]:
        yield from epoch_micro_batches(list(self.sampler), self.micro_batch_size, self.world_size,
                                       self.grad_accum_steps)

    def __len__(self) -> int:
        """Micro-batches per epoch over all ranks: a multiple of world_size x grad_accum_steps."""
        return len(micro_batch_sizes(len(self.sampler), self.micro_batch_size,
                                     self.world_size * self.grad_accum_steps))
