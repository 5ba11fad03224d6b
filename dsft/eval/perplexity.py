"""Token-weighted perplexity: exp(total negative log-likelihood / number of target tokens).

Every target token counts once, whatever the batch it falls in: averaging per-batch losses (what
the Trainer's eval_loss does) over-weights the tokens of short batches. Padding carries no label,
so it never counts; a packed row is scored the same as its samples apart, because only labelled
positions enter the sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Perplexity:
    value: float
    nll_sum: float
    target_tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.target_tokens


def _pad(rows: Sequence[dict], pad_id: int):
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[i, :length] = torch.tensor(row["input_ids"])
        labels[i, :length] = torch.tensor(row["labels"])
        attention_mask[i, :length] = 1
    return input_ids, labels, attention_mask


def batch_nll(model, input_ids, labels, attention_mask) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over labelled positions, and their count."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return float(nll), int((targets != IGNORE_INDEX).sum())


def perplexity(model, rows: Sequence[dict], pad_id: int, batch_size: int = 8) -> Perplexity | None:
    """Perplexity of the labelled tokens of rows ({"input_ids", "labels"}); None when no token is labelled."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            input_ids, labels, attention_mask = _pad(rows[start : start + batch_size], pad_id)
            batch_sum, batch_tokens = batch_nll(model, input_ids.to(device), labels.to(device), attention_mask.to(device))
            nll_sum, tokens = nll_sum + batch_sum, tokens + batch_tokens
    model.train(was_training)
    if tokens == 0:
        return None
    return Perplexity(math.exp(nll_sum / tokens), nll_sum, tokens)
