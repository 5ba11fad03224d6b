"""Token-weighted perplexity equals exp(mean token loss) computed by hand, whatever the padding."""

import math

import pytest
import torch

from dsft.eval.perplexity import perplexity
from dsft.models.presets import build_preset


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_preset("tiny-llama", tokenizer, seed=0, dtype=torch.float32).eval()


ROWS = [
    {"input_ids": [5, 9, 14, 22, 31, 7], "labels": [-100, -100, 14, 22, 31, 7]},
    {"input_ids": [8, 3], "labels": [-100, 3]},
    {"input_ids": [40, 41, 42, 43, 44, 45, 46, 47, 48], "labels": [-100, -100, -100, -100, -100, 45, 46, -100, 48]},
]


def by_hand(model, rows):
    total_nll, count = 0.0, 0
    for row in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        for t in range(1, len(row["input_ids"])):
            if row["labels"][t] != -100:
                total_nll -= float(log_probs[t - 1, row["labels"][t]])
                count += 1
    return math.exp(total_nll / count), count


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_perplexity_is_exp_of_the_mean_token_loss(model, tokenizer, batch_size):
    expected, count = by_hand(model, ROWS)
    result = perplexity(model, ROWS, tokenizer.pad_token_id, batch_size=batch_size)
    assert result.target_tokens == count == 8
    assert result.value == pytest.approx(expected, rel=1e-5)


def test_single_row_matches_the_model_own_loss(model, tokenizer):
    row = ROWS[0]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
    assert perplexity(model, [row], tokenizer.pad_token_id).value == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_no_labelled_token_gives_none(model, tokenizer):
    assert perplexity(model, [{"input_ids": [1, 2], "labels": [-100, -100]}], tokenizer.pad_token_id) is None
