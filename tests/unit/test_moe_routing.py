"""MoE routing pieces (dsft/models/moe.py, moe_targets.py): loads counted from the routers' own outputs, DeepSeek-V3's
bias rule, the auxiliary balance losses against hand-computed values, the expert groups LoRA reaches."""

import pytest
import torch

from dsft.config import LoraConfig, MethodConfig
from dsft.config.moe import AuxLossConfig
from dsft.errors import DsftError
from dsft.models.method import apply_method
from dsft.models.moe import (
    ExpertLoads,
    Routed,
    apply_bias_updates,
    balance_losses,
    bias_update,
    find_routers,
    load_stats,
    most_loaded,
    route_sequences,
    window_summary,
)
from dsft.models.moe_targets import keep_only_experts
from dsft.models.presets import build_preset


def _model(tokenizer, preset="tiny-deepseek-v3"):
    return build_preset(preset, tokenizer, seed=0, dtype=torch.float32)


def _padded_batch(tokenizer):
    ids = torch.randint(10, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-deepseek-v2", "tiny-deepseek-v4"])
def test_loads_sum_to_real_tokens_times_top_k_in_every_layer(tokenizer, preset):
    model = _model(tokenizer, preset)
    routers = find_routers(model)
    ids, mask = _padded_batch(tokenizer)
    loads = ExpertLoads(model, mode="all")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    counts = loads.take_counts()
    assert counts.shape == (len(routers), routers[0].num_experts)
    assert counts.sum(dim=1).tolist() == [int(mask.sum()) * routers[0].top_k] * len(routers)
    # The same padded batch counted without its mask would count the 14 pads as well.
    assert int(mask.numel() - mask.sum()) == 14


def test_train_mode_counts_forwards_with_gradients_only(tokenizer):
    model = _model(tokenizer)
    ids, mask = _padded_batch(tokenizer)
    loads = ExpertLoads(model, mode="train")
    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # generation, a reference model, evaluation
    assert int(loads.take_counts().sum()) == 0
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert int(loads.take_counts().sum()) == int(mask.sum()) * 2 * 3
    loads.remove()
    model(input_ids=ids, attention_mask=mask)
    assert int(loads.take_counts().sum()) == 0


def test_counts_match_a_recount_of_the_routers_outputs(tokenizer):
    model = _model(tokenizer)
    routers = find_routers(model)
    seen = []
    handles = [r.module.register_forward_hook(lambda m, a, out: seen.append(out[2].clone())) for r in routers]
    ids, _ = _padded_batch(tokenizer)
    counts = route_sequences(model, [ids[0].tolist()], batch_size=1)
    for handle in handles:
        handle.remove()
    expected = torch.stack([torch.bincount(indices.reshape(-1), minlength=8) for indices in seen])
    assert torch.equal(counts, expected)


def test_bias_rule_moves_each_expert_by_gamma_toward_the_mean_load():
    bias = torch.tensor([0.5, 0.0, -0.25, 0.0, 0.1])
    loads = torch.tensor([10, 0, 5, 5, 5])  # mean 5
    after = bias_update(bias, loads, 0.01)
    assert torch.allclose(after, torch.tensor([0.49, 0.01, -0.25, 0.0, 0.1]), atol=1e-7)
    assert after.dtype == bias.dtype


def test_bias_updates_reduce_the_imbalance_of_a_skewed_router(tokenizer):
    model = _model(tokenizer)
    routers = find_routers(model)
    with torch.no_grad():
        for router in routers:  # every token is sent to experts 0 and 1
            router.module.e_score_correction_bias[:2] = 0.5
    sequences = [torch.randint(10, len(tokenizer), (24,), generator=torch.Generator().manual_seed(s)).tolist()
                 for s in range(4)]
    first = route_sequences(model, sequences, 4)
    assert window_summary(load_stats(first, routers))["moe_load_imbalance"] == pytest.approx(4.0)  # experts / top-k
    counts = first
    for _ in range(40):
        assert apply_bias_updates(routers, counts, 0.01) == len(routers)
        counts = route_sequences(model, sequences, 4)
    assert window_summary(load_stats(counts, routers))["moe_load_imbalance"] < 2.0
    # The overloaded experts' bias came down from 0.5, the idle ones' went up from 0.
    bias = routers[0].module.e_score_correction_bias
    assert bias[:2].max() < 0.5 and bias[2:].min() > 0


def test_load_stats_and_window_summary_on_known_counts(tokenizer):
    routers = find_routers(_model(tokenizer))
    counts = torch.zeros(3, 8, dtype=torch.long)
    counts[0] = torch.tensor([8, 8, 8, 8, 8, 8, 8, 8])  # balanced
    counts[1] = torch.tensor([32, 16, 8, 4, 2, 2, 0, 0])
    stats = load_stats(counts, routers)
    assert stats[0]["imbalance"] == 1.0 and stats[0]["cv"] == 0.0 and stats[0]["cold_experts"] == 0
    assert stats[1]["imbalance"] == pytest.approx(32 / 64 * 8, abs=1e-4)
    assert stats[1]["cold_experts"] == 2  # 0 < 10% of the mean 8
    assert stats[2]["routed_pairs"] == 0 and stats[2]["imbalance"] is None
    summary = window_summary(stats)
    assert summary["moe_load_imbalance"] == 4.0 and summary["moe_cold_experts"] == 2
    assert most_loaded(counts, routers, 2)[routers[1].layer] == [0, 1]


def test_expert_level_and_sequence_losses_match_the_papers_formulas(tokenizer):
    routers = find_routers(_model(tokenizer, "tiny-deepseek-v2"))  # softmax scores
    logits = torch.randn(2 * 5, 8, generator=torch.Generator().manual_seed(0))
    indices = logits.topk(2, dim=-1).indices
    mask = torch.tensor([1.0] * 5 + [1.0] * 3 + [0.0] * 2)
    routed = Routed(logits, indices, mask, rows=(2, 5))
    expert = balance_losses([routed], routers[:1], AuxLossConfig(expert=0.5))
    probabilities = logits.softmax(-1)
    real = mask.bool()
    f = torch.stack([(indices[real] == e).any(-1).float().sum() for e in range(8)]) * 8 / (2 * int(real.sum()))
    p = probabilities[real].mean(0)
    assert float(expert) == pytest.approx(0.5 * float((f * p).sum()), rel=1e-6)
    sequence = balance_losses([routed], routers[:1], AuxLossConfig(sequence=1.0))
    per_sequence = []
    for rows in (slice(0, 5), slice(5, 8)):
        chosen, probs = indices[rows], probabilities[rows]
        f_b = torch.stack([(chosen == e).any(-1).float().sum() for e in range(8)]) * 8 / (2 * chosen.shape[0])
        per_sequence.append(float((f_b * probs.mean(0)).sum()))
    assert float(sequence) == pytest.approx(sum(per_sequence) / 2, rel=1e-6)


def test_device_loss_groups_experts_and_the_gradient_reaches_the_router(tokenizer):
    routers = find_routers(_model(tokenizer, "tiny-deepseek-v2"))
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    indices = logits.detach().topk(2, dim=-1).indices
    routed = Routed(logits, indices, torch.ones(6), rows=None)
    loss = balance_losses([routed], routers[:1], AuxLossConfig(device=1.0, devices=2))
    probabilities = logits.detach().softmax(-1)
    f = torch.stack([(indices == e).any(-1).float().sum() for e in range(8)]) * 8 / (2 * 6)
    p = probabilities.mean(0)
    expected = sum(float(f[g * 4:(g + 1) * 4].mean() * p[g * 4:(g + 1) * 4].sum()) for g in range(2))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def _adapted(model) -> set[str]:
    return {name.split(".lora_")[0].replace(".base_layer", "") for name, _ in model.named_parameters() if "lora_A" in name}


@pytest.mark.parametrize(("experts", "shared", "routed"), [("all", True, True), ("shared", True, False),
                                                          ("routed", False, True), ("none", False, False)])
def test_all_linear_reaches_the_expert_groups_asked_for(tokenizer, experts, shared, routed):
    method = MethodConfig(type="lora", lora=LoraConfig(r=4, alpha=8), moe={"experts": experts})
    adapted = _adapted(apply_method(_model(tokenizer), method))
    assert any(name.endswith("layers.0.mlp.gate_proj") for name in adapted)  # the dense layer, always
    assert any(name.endswith("self_attn.kv_b_proj") for name in adapted)
    assert any("shared_experts" in name for name in adapted) == shared
    assert any(name.endswith("mlp.experts") for name in adapted) == routed
    assert not any(name.endswith("mlp.gate") for name in adapted)  # router auto: frozen under an adapter


def test_rank_per_group_and_lora_on_the_router(tokenizer):
    method = MethodConfig(type="lora", lora=LoraConfig(r=4, alpha=8),
                          moe={"shared_rank": 2, "routed_rank": 6, "router": "train", "router_adapter": "lora"})
    model = apply_method(_model(tokenizer), method)
    layer = model.get_base_model().model.layers[1].mlp
    assert layer.shared_experts.gate_proj.lora_A["default"].weight.shape[0] == 2
    assert layer.experts.lora_A["default"].weight.shape[0] == 8 * 6  # down_proj: rank 6 per expert
    assert layer.experts.base_layer.lora_A["default"].weight.shape[0] == 8 * 12  # gate_up: 6 each for gate and up
    assert layer.gate.lora_A["default"].weight.requires_grad
    assert model.get_base_model().model.layers[1].self_attn.o_proj.lora_A["default"].weight.shape[0] == 4


def test_router_policy_under_an_adapter_and_full_fine_tuning(tokenizer):
    bias_only = apply_method(_model(tokenizer), MethodConfig(type="lora", moe={"bias_update": "on"}))
    gate = bias_only.get_base_model().model.layers[1].mlp.gate
    assert "default" in gate.modules_to_save  # saved beside the adapter, carrying the bias
    assert not any(p.requires_grad for p in gate.parameters())  # router auto: freeze
    trained = apply_method(_model(tokenizer), MethodConfig(type="lora", moe={"router": "train"}))
    assert trained.get_base_model().model.layers[1].mlp.gate.modules_to_save["default"].weight.requires_grad
    full = apply_method(_model(tokenizer), MethodConfig(type="full", moe={"router": "freeze"}))
    assert not any(r.module.weight.requires_grad for r in find_routers(full))
    assert full.model.layers[1].mlp.experts.gate_up_proj.requires_grad


def test_keep_only_experts_holds_the_others_at_exactly_zero(tokenizer):
    model = apply_method(_model(tokenizer), MethodConfig(type="lora", lora=LoraConfig(r=2, alpha=4, init="gaussian")))
    experts = model.get_base_model().model.layers[1].mlp.experts
    b = experts.lora_B["default"].weight
    with torch.no_grad():
        b.normal_()
    assert keep_only_experts(model, {1: [3, 5], 2: [0], 3: [7]}) == 6
    (b * torch.randn_like(b)).sum().backward()
    kept = [column % 8 in (3, 5) for column in range(b.shape[1])]
    assert all((b[:, c].abs().sum() > 0) == k for c, k in enumerate(kept))
    assert all((b.grad[:, c].abs().sum() > 0) == k for c, k in enumerate(kept))


def test_moe_settings_a_model_cannot_honour_are_refused(tokenizer):
    with pytest.raises(DsftError, match="method.moe.experts: not available for a dense model"):
        apply_method(_model(tokenizer, "tiny-qwen2"), MethodConfig(type="lora", moe={"experts": "shared"}))
    with pytest.raises(DsftError, match="names gate, the router, while method.moe.router is freeze"):
        apply_method(_model(tokenizer), MethodConfig(type="lora", lora=LoraConfig(target_modules=["gate", "o_proj"])))
    with pytest.raises(ValueError, match="method.moe.top_experts goes with method.moe.experts top"):
        MethodConfig(type="lora", moe={"experts": "top"})
    with pytest.raises(ValueError, match="needs method.type lora or qlora"):
        MethodConfig(type="full", moe={"experts": "shared"})
