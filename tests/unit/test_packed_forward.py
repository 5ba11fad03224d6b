"""Packed forwards of padded batches (dsft.models.packed_forward): exact packing bookkeeping, and for every head kind
(causal LM, sequence classifier, token classifier, bare backbone) and both attention kernels the packed forward's
outputs and gradients equal the padded forward's, full and LoRA, right- and left-padded.

Tolerances: both sides run in this process, on whatever CPU path it has, through sums of different shapes (one row of
many sequences against padded rows), so they are equal up to rounding, not bitwise; one forward and backward, no
optimizer step, so the gap stays at rounding size: loss rtol 1e-5, gradients rtol 1e-4 hold on each CPU path the
suite is checked on (README, Tests)."""

import pytest
import torch

from dsft.models import packed_forward
from dsft.models.packed_forward import pack_model, packed_positions, unpack_tokens
from dsft.models.presets import build_preset, build_preset_classifier


def test_positions_restart_at_each_row_and_skip_padding():
    attention_mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    assert packed_positions(attention_mask).tolist() == [[0, 1, 2, 0, 1, 2, 0]]


def test_unpack_puts_each_token_under_its_padded_position_with_zeros_at_padding():
    attention_mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    values = torch.tensor([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]]], requires_grad=True)
    unpacked = unpack_tokens(values, attention_mask)
    assert unpacked.tolist() == [[[1.0, 10.0], [2.0, 20.0], [0.0, 0.0]], [[0.0, 0.0], [3.0, 30.0], [4.0, 40.0]]]
    (unpacked * torch.arange(12.0).reshape(2, 3, 2)).sum().backward()
    assert values.grad.tolist() == [[[0.0, 1.0], [2.0, 3.0], [8.0, 9.0], [10.0, 11.0]]]


def batch(tokenizer, left_padded: bool):
    tokenizer.padding_side = "left" if left_padded else "right"
    texts = ["what is the answer 12 + 3?", "hello", "请回答 问题 the exact sevens and think 7"]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    assert (encoded["attention_mask"] == 0).any()
    return dict(encoded)


def build(kind: str, preset: str, tokenizer, method: str):
    if kind == "causal_lm":
        model = build_preset(preset, tokenizer, seed=3, dtype=torch.float32)
    elif kind == "backbone":
        model = build_preset(preset, tokenizer, seed=3, dtype=torch.float32).model
    else:
        model = build_preset_classifier(preset, tokenizer, 3, torch.float32, ["a", "b", "c"], task=kind)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    # Dropout off (the token classifier's head has some), so both forwards see the same function.
    return model.eval()


def see_every_key(model):
    """model with V3.2's indexers keeping every key a query may see (index_topk above the longest row).

    While the indexer selects (8 of 11 keys), equal index scores (its ReLU gives exact zeros) are broken by
    torch.topk by their place in the row, and a packed row places them elsewhere than a padded one: packed and
    padded then pick different, equally top-scored keys. Packing still keeps each sample to itself, which
    test_v32_packed_samples_do_not_see_each_other_while_the_indexer_selects shows in that regime."""
    for module in model.modules():
        if hasattr(module, "index_topk"):
            module.index_topk = 1024
    return model


def outputs_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    value = out.logits if hasattr(out, "logits") else out.last_hidden_state
    mask = inputs["attention_mask"].bool()
    # Padding positions differ by design (garbage padded, zeros packed); every head reads real tokens only.
    kept = value if value.dim() == 2 else value[mask]
    (kept.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return kept.detach(), grads


@pytest.mark.parametrize("kind, preset, attention, method, left_padded", [
    ("classification", "tiny-qwen2", "sdpa", "full", False),
    ("classification", "tiny-deepseek-v3", "eager", "lora", False),
    ("classification", "tiny-qwen2", "eager", "full", True),
    ("token_classification", "tiny-deepseek-v3", "sdpa", "full", False),
    ("causal_lm", "tiny-qwen2", "sdpa", "lora", True),
    ("causal_lm", "tiny-deepseek-v3", "sdpa", "full", True),
    ("causal_lm", "tiny-deepseek-v32", "sdpa", "full", False),
    ("causal_lm", "tiny-deepseek-v32", "eager", "lora", True),
    ("backbone", "tiny-deepseek-v32", "eager", "lora", False),
    ("backbone", "tiny-llama", "sdpa", "full", False),
])
def test_packed_forward_equals_padded(tokenizer, monkeypatch, kind, preset, attention, method, left_padded):
    model = see_every_key(build(kind, preset, tokenizer, method))
    model.config._attn_implementation = attention
    inputs = batch(tokenizer, left_padded)
    expected, expected_grads = outputs_and_grads(model, inputs)
    packed_calls = []
    monkeypatch.setattr(packed_forward, "packed_positions",
                        lambda mask: packed_calls.append(1) or packed_positions(mask))
    pack_model(model)
    pack_model(model)  # idempotent: wrapping twice packs once
    actual, grads = outputs_and_grads(model, inputs)
    assert packed_calls == [1]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_v32_packed_samples_do_not_see_each_other_while_the_indexer_selects(tokenizer, attention):
    model = build("backbone", "tiny-deepseek-v32", tokenizer, "full")
    model.config._attn_implementation = attention
    pack_model(model)
    inputs = batch(tokenizer, left_padded=False)
    assert model.layers[0].self_attn.indexer.index_topk < int(inputs["attention_mask"].sum(-1).max())
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    assert inputs["attention_mask"][0].all()
    changed["input_ids"][0] = changed["input_ids"][0].flip(0)  # the first sample's tokens, reordered
    with torch.no_grad():
        before, after = model(**inputs).last_hidden_state, model(**changed).last_hidden_state
    assert not torch.equal(before[0], after[0])
    # The other samples of the packed row are the same, whatever the first sample holds, up to rounding (1e-6 here,
    # as in the padded batch: the MoE groups the row's tokens by expert); one causal row across the samples moves
    # them by 2.3.
    torch.testing.assert_close(after[1:], before[1:], rtol=1e-5, atol=1e-5)


def test_generation_and_unpadded_batches_run_unpacked(tokenizer, monkeypatch):
    model = build_preset("tiny-qwen2", tokenizer, seed=3, dtype=torch.float32)
    pack_model(model)
    packed_calls = []
    monkeypatch.setattr(packed_forward, "packed_positions",
                        lambda mask: packed_calls.append(1) or packed_positions(mask))
    tokenizer.padding_side = "left"
    prompts = tokenizer(["hello", "what is the answer"], return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    model.generate(**prompts, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model(**tokenizer(["hello"], return_tensors="pt"))
    assert packed_calls == []
