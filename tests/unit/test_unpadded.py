"""DeepSeek-V4 never sees a pad before a real token (models/unpadded.py): a left-padded batch gives each row's
logits and gradients as if padded on the right (equal to the row alone), and without the guard it does not; batched
generation of prompts of different lengths equals each prompt alone."""

import pytest
import torch

from dsft.errors import DsftError
from dsft.models.families import refuse_packing
from dsft.models.presets import build_preset
from dsft.models.unpadded import guard_padding

from .test_packed_forward import batch


def logits_and_grads(model, inputs):
    model.zero_grad()
    logits = model(**inputs).logits[inputs["attention_mask"].bool()]
    (logits.float() ** 2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_left_padding_runs_as_right_padding_and_only_with_the_guard(tokenizer):
    model = build_preset("tiny-deepseek-v4", tokenizer, seed=3, dtype=torch.float32).eval()
    right, left = batch(tokenizer, left_padded=False), batch(tokenizer, left_padded=True)
    expected, expected_grads = logits_and_grads(model, right)  # right padding: pads only after real tokens
    unguarded, _ = logits_and_grads(model, left)
    assert (unguarded - expected).abs().max() > 1e-3  # the pads entered the compressors' windows
    guard_padding(model)
    guard_padding(model)  # idempotent
    actual, grads = logits_and_grads(model, left)
    # One process, one CPU path, the same tokens in rows of the same width: tolerances that hold on each path checked.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_generation_groups_prompts_by_length_and_equals_each_alone(tokenizer):
    model = guard_padding(build_preset("tiny-deepseek-v4", tokenizer, seed=3, dtype=torch.float32).eval())
    inputs = batch(tokenizer, left_padded=True)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    together = model.generate(**inputs, **settings)
    width = inputs["input_ids"].shape[1]
    for row in range(inputs["input_ids"].shape[0]):
        real = inputs["attention_mask"][row].bool()
        alone = model.generate(input_ids=inputs["input_ids"][row][real].unsqueeze(0), **settings)[0]
        assert together[row, : width - int(real.sum())].eq(tokenizer.pad_token_id).all()  # its own left padding
        completion = together[row, width - int(real.sum()):][: len(alone)]
        assert completion.tolist() == alone.tolist()


def test_other_models_are_left_as_they_are_and_v4_refuses_packing(tokenizer):
    qwen = build_preset("tiny-qwen2", tokenizer, seed=3, dtype=torch.float32)
    forward = qwen.model.forward
    assert guard_padding(qwen) is qwen and qwen.model.forward == forward and "generate" not in vars(qwen)
    refuse_packing(qwen, True)
    v4 = build_preset("tiny-deepseek-v4", tokenizer, seed=3, dtype=torch.float32)
    refuse_packing(v4, False)
    with pytest.raises(DsftError, match="train.packing: not available for deepseek_v4: .*compressors"):
        refuse_packing(v4, True)


@pytest.mark.parametrize("asks, coef", [(False, 0.0), (True, None)])
def test_trl_gets_the_router_loss_only_when_the_model_asks_for_it(asks, coef):
    from types import SimpleNamespace

    from transformers import DeepseekV4Config, MixtralConfig

    from dsft.train.trl_stage import router_aux_loss_coef

    v4 = SimpleNamespace(config=DeepseekV4Config(output_router_logits=asks, router_aux_loss_coef=0.25))
    mixtral = SimpleNamespace(config=MixtralConfig(output_router_logits=asks, router_aux_loss_coef=0.25))
    assert router_aux_loss_coef(mixtral) == (0.25 if asks else 0.0)
    if coef is None:  # V4's config has no num_experts, which TRL's router loss reads
        with pytest.raises(DsftError, match="output_router_logits.*num_experts.*deepseek_v4"):
            router_aux_loss_coef(v4)
    else:
        assert router_aux_loss_coef(v4) == coef
