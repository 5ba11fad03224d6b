"""The chunked causal-LM loss: the model's own loss and gradients, padded and packed, with LoRA, with gradient
accumulation, and never a [tokens, vocab] logits tensor.

Tolerances: both sides run in this process, on whatever CPU path it has, through sums of different shapes (one row of
many sequences against padded rows), so they are equal up to rounding, not bitwise; one forward and backward, no
optimizer step, so the gap stays at rounding size: loss rtol 1e-5, gradients rtol 1e-4 hold on each CPU path the
suite is checked on (README, Tests)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsft.config import MethodConfig
from dsft.data.packing import PackedCollator, packed_rows
from dsft.models.method import apply_method
from dsft.models.presets import build_preset
from dsft.models.chunked_loss import chunked_lm_loss, plain_linear_head


def _samples(tokenizer, lengths=(9, 4, 13, 6, 11)):
    torch.manual_seed(0)
    samples = []
    for length in lengths:
        ids = torch.randint(10, len(tokenizer), (length,)).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})
    return samples


def _padded(samples):
    width = max(len(s["input_ids"]) for s in samples)
    return {
        "input_ids": torch.tensor([s["input_ids"] + [0] * (width - len(s["input_ids"])) for s in samples]),
        "attention_mask": torch.tensor([[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in samples]),
        "labels": torch.tensor([s["labels"] + [-100] * (width - len(s["labels"])) for s in samples]),
    }


def _loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(expected, actual):
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-6)
    assert actual[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(actual[1][name], expected[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-qwen2"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_loss_and_gradients_equal_the_models_own(tokenizer, preset, layout):
    model = build_preset(preset, tokenizer, seed=0, dtype=torch.float32)
    samples = _samples(tokenizer)
    batch = _padded(samples) if layout == "padded" else PackedCollator(0)(packed_rows(samples, capacity=24))
    expected = _loss_and_grads(model, lambda: model(**batch).loss)
    actual = _loss_and_grads(model, lambda: chunked_lm_loss(model, batch, chunk_tokens=5))
    _assert_same(expected, actual)
    assert "lm_head.weight" in actual[1]  # full fine-tuning: the head's gradient comes from the chunks too


def test_lora_and_gradient_accumulation_normalise_as_the_trainer_does(tokenizer):
    # Two micro-batches of one optimizer step, each divided by the step's count of scored tokens.
    model = apply_method(build_preset("tiny-deepseek-v3", tokenizer, seed=0, dtype=torch.float32), MethodConfig(type="lora"))
    with torch.no_grad():  # B starts at zero: give the adapters a nonzero path so their gradients differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    halves = [_padded(part) for part in (_samples(tokenizer)[:2], _samples(tokenizer)[2:])]
    items = sum(int((h["labels"][:, 1:] != -100).sum()) for h in halves)

    def accumulate(loss_of):
        return sum(loss_of(half) for half in halves)

    expected = _loss_and_grads(model, lambda: accumulate(lambda b: model(**b, num_items_in_batch=items).loss))
    actual = _loss_and_grads(model, lambda: accumulate(lambda b: chunked_lm_loss(model, b, 7, torch.tensor(items))))
    _assert_same(expected, actual)
    assert any("lora_A" in name for name in actual[1]) and "base_model.model.lm_head.weight" not in actual[1]


PRODUCTS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default})


class _LogitRows(TorchDispatchMode):
    """Records the most rows of logits (a matrix product's output with the vocabulary as its last dimension)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.max_rows = vocab_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in PRODUCTS and out.shape[-1] == self.vocab_size:
            self.max_rows = max(self.max_rows, out.numel() // self.vocab_size)
        return out


def test_never_holds_the_logits_of_every_token(tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config

    vocab = 8192  # larger than the hidden size, so logits dominate as they do in real models
    model = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, vocab, (2, 48))
    batch = {"input_ids": ids, "labels": ids}
    for compute, limit in ((lambda: model(**batch).loss, None), (lambda: chunked_lm_loss(model, batch, 16), 16)):
        with _LogitRows(vocab) as rows:
            compute().backward()
        if limit is None:
            assert rows.max_rows >= 2 * 48  # the model's own loss: every position's logits at once
        else:
            assert rows.max_rows <= limit


def test_plain_head_is_found_under_peft_and_lora_on_the_head_is_refused(tokenizer):
    from peft import LoraConfig, get_peft_model

    saved = get_peft_model(build_preset("tiny-qwen2", tokenizer, 0, torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = saved.get_base_model().get_output_embeddings()
    assert plain_linear_head(head) is head.modules_to_save["default"]
    adapted = get_peft_model(build_preset("tiny-qwen2", tokenizer, 0, torch.float32), LoraConfig(r=4, target_modules=["lm_head"]))
    assert plain_linear_head(adapted.get_base_model().get_output_embeddings()) is None
    with pytest.raises(ValueError, match="plain linear lm_head"):
        chunked_lm_loss(adapted, _padded(_samples(tokenizer)), 8)
