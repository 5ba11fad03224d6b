"""LoRA on DeepSeek's routed experts: every experts implementation gives eager's loss and gradients, and dsft's
grouped low-rank path forms no expert-stack-sized tensor in the backward.

Tolerances: every implementation runs in this process on the same CPU path, with its own order of sums (grouped,
batched or per-expert GEMMs): equal up to rounding; one forward and backward, loss rtol 1e-5 and gradients rtol 1e-4,
which hold on each CPU path the suite is checked on (README, Tests)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsft.config import LoraConfig, MethodConfig
from dsft.models.method import apply_method
from dsft.models.moe_lora import GROUPED_LORA, register_grouped_lora
from dsft.models.presets import build_preset


def _lora_moe(tokenizer, rank: int):
    model = apply_method(build_preset("tiny-deepseek-v3", tokenizer, seed=0, dtype=torch.float32),
                         MethodConfig(type="lora", lora=LoraConfig(r=rank, alpha=2 * rank)))
    with torch.no_grad():  # B starts at zero; a nonzero update makes the experts' LoRA path count in the loss
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def _loss_and_grads(model, implementation, batch):
    model.get_base_model().set_experts_implementation(implementation)
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("rank", [8, 2])  # rank 2 in float32 has 8-byte strides: the per-expert fallback
def test_every_experts_implementation_matches_eager_with_lora_on_the_experts(tokenizer, rank):
    model = _lora_moe(tokenizer, rank)
    assert any("experts" in name and "lora_A" in name for name, _ in model.named_parameters())
    ids = torch.randint(10, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    expected_loss, expected = _loss_and_grads(model, "eager", batch)
    for implementation in ("grouped_mm", "batched_mm", register_grouped_lora()):
        loss, grads = _loss_and_grads(model, implementation, batch)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6, msg=implementation)
        assert grads.keys() == expected.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6, msg=f"{implementation} {name}")


class _Shapes(TorchDispatchMode):
    """Records the sizes of the tensors ops compute (views of existing tensors are not new memory)."""

    def __init__(self):
        super().__init__()
        self.numels = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.numels.update(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out])
                               if isinstance(t, torch.Tensor))
        return out


def test_grouped_lora_forms_no_expert_stack_in_the_backward(tokenizer):
    model = _lora_moe(tokenizer, 8)
    experts = model.get_base_model().model.layers[1].mlp.experts.get_base_layer()
    stack = experts.gate_up_proj.numel()  # experts x 2 x moe_intermediate x hidden
    ids = torch.randint(10, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    seen = {}
    for implementation in ("grouped_mm", register_grouped_lora()):
        model.get_base_model().set_experts_implementation(implementation)
        loss = model(input_ids=ids, labels=ids).loss
        with _Shapes() as shapes:
            loss.backward()
        seen[implementation] = stack in shapes.numels
    # transformers' kernel reads PEFT's adapted stack, so the backward forms its full-size gradient; dsft's does not.
    assert seen == {"grouped_mm": True, GROUPED_LORA: False}


def test_fused_expert_patterns_apply_without_peft_false_warning(tokenizer, recwarn):
    # dsft (models/moe_targets.py), as PEFT's own rewrite did, doubles rank and alpha for the fused gate_up_proj
    # tensor (gate and up keep rank r each); PEFT then warns that the pattern matched no module: dsft keeps the
    # pattern and drops only that warning.
    model = apply_method(build_preset("tiny-deepseek-v3", tokenizer, seed=0, dtype=torch.float32),
                         MethodConfig(type="lora", lora=LoraConfig(r=4, alpha=8)))
    assert model.peft_config["default"].rank_pattern == {r".*\.experts\.gate_up_proj": 8, r".*\.experts\.down_proj": 4}
    experts = model.get_base_model().model.layers[1].mlp.experts
    n_experts = model.get_base_model().config.n_routed_experts
    assert experts.base_layer.lora_A["default"].weight.shape[0] == n_experts * 8  # gate_up_proj: rank 2r per expert
    assert experts.lora_A["default"].weight.shape[0] == n_experts * 4  # down_proj: rank r per expert
    assert not [w for w in recwarn if "pattern keys did not match" in str(w.message)]


def test_fused_expert_patterns_let_every_other_warning_through():
    import warnings

    from dsft.models.method import fused_expert_patterns

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fused_expert_patterns():
            warnings.warn("The following rank_pattern keys did not match any targeted module and were ignored: "
                          "['x']", RuntimeWarning)
            warnings.warn("The following alpha_pattern keys did not match", UserWarning)  # not PEFT's: passes
            warnings.warn("something else", RuntimeWarning)
    assert [(w.category, str(w.message)) for w in caught] == [
        (UserWarning, "The following alpha_pattern keys did not match"), (RuntimeWarning, "something else")]
