"""Where an adapter goes on a DeepSeek mixture-of-experts model, as method.moe says: which experts LoRA reaches
(all, shared, routed, the most loaded routed ones, none), at which rank, and what happens to the routers.

Why dsft spells the targets out. For DeepSeek V2, V3 and V3.2, PEFT rewrites a LoRA config written for transformers
v4, where the expert and router projections were nn.Linear modules named gate_proj / up_proj / down_proj / gate, into
parameter targets of transformers v5's fused experts (experts.gate_up_proj, experts.down_proj) and the router
(gate.weight). It rewrites every target of those names, so all-linear used to leave the dense first layers' MLP and
the shared experts, which are still nn.Linear modules of those names, without an adapter, and put one on every
router. dsft gives PEFT names it does not rewrite: the attention's linear modules by name, and the dense MLP, the
shared experts, the routed experts and (router_adapter lora) the gate as target_parameters. A LoRA pair on a linear
weight through target_parameters is the same update as on the module (merged the same way, export/lora.py); it forms
the weight's delta in each forward, a cost that only the dense and shared MLPs pay.

A 4-bit or 8-bit base (qlora) stores the dense and shared MLP weights packed, which a parameter adapter cannot read:
there they stay without an adapter, and experts: shared is refused.

DeepSeek-V4 is not rewritten by PEFT: all-linear reaches its linear modules, its routed experts are parameter
targets (models/families.py), and the shared experts are left out by an exclude pattern where asked.

The most loaded experts (experts: top). The routed experts of a layer are one fused tensor with one LoRA pair over
all of them (PEFT stores B as [out, r * experts], column j * experts + e being expert e's j-th). The experts not
chosen get their columns of B set to zero and a gradient hook that keeps them there, so their update is exactly
zero through training, merge and export, while the chosen ones train as usual in the same grouped GEMM.
"""

from __future__ import annotations

from dsft.errors import DsftError
from dsft.models.families import family_of, linear_module_names

REWRITTEN_BY_PEFT = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
"""Model types whose LoRA targets PEFT rewrites from transformers v4 names (see above)."""
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
ROUTED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
SHARED = tuple(f"shared_experts.{name}.weight" for name in MLP_NAMES)
DENSE = tuple(f"mlp.{name}.weight" for name in MLP_NAMES)
GATE_WEIGHT = "mlp.gate.weight"
GATE_MODULE = "mlp.gate"
HEADS = ("lm_head", "score")


def moe_lora_arguments(method, model, family_exclude: str | None) -> dict:
    """LoraConfig arguments (target_modules, target_parameters, exclude_modules, rank and alpha patterns, extra
    modules_to_save) for method on an MoE model with routers; {} for a dense model."""
    from dsft.models.moe import find_routers

    routers = find_routers(model)
    if not routers:
        _refuse_moe_keys(method, "a dense model")
        return {}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arguments = _router_arguments(method, routers)
    gate_lora = arguments.pop("gate_lora", False)
    if method.lora.target_modules != "all-linear":
        _refuse_moe_keys(method, "an explicit method.lora.target_modules list")
        if method.moe.router_for(method.type) == "freeze" and "gate" in method.lora.target_modules:
            raise DsftError("method.lora.target_modules names gate, the router, while method.moe.router is freeze")
    elif model_type in REWRITTEN_BY_PEFT:
        arguments.update(_spelled_out(method, model, family_exclude))
    elif family_of(model_type).expert_parameters:
        arguments.update(_v4_targets(method, family_exclude, family_of(model_type).expert_parameters))
    else:
        _refuse_moe_keys(method, f"{model_type} (they apply to DeepSeek V2, V3, V3.2 and V4)")
    if gate_lora:
        arguments["target_parameters"] = [*arguments.get("target_parameters", []), GATE_WEIGHT]
    return arguments


def _refuse_moe_keys(method, where: str) -> None:
    for key in ("experts", "top_experts", "shared_rank", "routed_rank"):
        if key in method.moe.changed():
            raise DsftError(f"method.moe.{key}: not available for {where}; it needs method.lora.target_modules "
                            "all-linear on a DeepSeek MoE model")


def _router_arguments(method, routers) -> dict:
    """modules_to_save for the gates when they train whole or carry a bias that updates; gate_lora for LoRA on them."""
    moe = method.moe
    trains = moe.router_for(method.type) == "train"
    bias_moves = moe.bias_updates_for(method.type) and any(router.has_bias for router in routers)
    if trains and moe.router_adapter == "lora":
        return {"gate_lora": True}
    return {"extra_modules_to_save": [GATE_MODULE]} if trains or bias_moves else {}


def _spelled_out(method, model, family_exclude: str | None) -> dict:
    moe, lora = method.moe, method.lora
    quantized = method.type == "qlora"
    if quantized and moe.experts == "shared":
        raise DsftError("method.moe.experts shared with method.type qlora: the shared experts' weights are stored "
                        "quantized, which LoRA on parameters cannot adapt; use method.type lora, or experts routed")
    attention = sorted(linear_module_names(model) - set(MLP_NAMES) - set(HEADS))
    parameters = [] if quantized else list(DENSE)
    if moe.experts in ("all", "shared", "top") and not quantized:
        parameters += SHARED
    if moe.experts in ("all", "routed", "top"):
        parameters += ROUTED
    ranks, alphas = {}, {}
    if ROUTED[0] in parameters:
        # gate and up are fused in one tensor: rank and alpha doubled keep r (and alpha / r) per projection, as
        # PEFT's own rewrite does.
        routed = moe.routed_rank or lora.r
        ranks[r".*\.experts\.gate_up_proj"], alphas[r".*\.experts\.gate_up_proj"] = 2 * routed, 2 * lora.alpha
        ranks[r".*\.experts\.down_proj"] = routed
    if moe.shared_rank and not quantized:
        ranks[r".*\.(shared_experts|mlp)\.(gate|up|down)_proj\.weight"] = moe.shared_rank
    arguments = {"target_modules": attention, "target_parameters": parameters, "moe_ranks": ranks,
                 "moe_alphas": alphas}
    if family_exclude is not None:
        arguments["exclude_modules"] = family_exclude
    return arguments


def _v4_targets(method, family_exclude: str | None, expert_parameters: tuple[str, ...]) -> dict:
    moe = method.moe
    excluded = [family_exclude] if family_exclude else []
    if moe.experts in ("routed", "none"):
        excluded.append(r".*\.shared_experts\..*")
    parameters = list(expert_parameters) if moe.experts in ("all", "routed", "top") else []
    ranks = {}
    if moe.routed_rank:
        ranks.update({rf".*\.{name.rsplit('.', 1)[-1]}": moe.routed_rank for name in parameters})
    if moe.shared_rank:
        ranks[r".*\.shared_experts\..*"] = moe.shared_rank
    arguments = {"target_modules": "all-linear", "target_parameters": parameters, "moe_ranks": ranks,
                 "moe_alphas": {}}
    if excluded:
        arguments["exclude_modules"] = f"({'|'.join(excluded)})"
    return arguments


def freeze_routers(model, routers) -> int:
    """Stop every router's gate weights from training (a LoRA pair or a modules_to_save copy included); returns
    how many parameters were frozen."""
    frozen = 0
    for router in routers:
        for param in router.module.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                frozen += 1
    return frozen


def keep_only_experts(model, chosen: dict[int, list[int]]) -> int:
    """experts top: zero and hold at zero the routed-expert LoRA columns of every expert not chosen in its layer
    (chosen: layer -> expert indices); returns the number of factor tensors restricted."""
    import re

    import torch
    from peft.tuners.lora.layer import ParamWrapper

    restricted = 0
    for path, layer in model.named_modules():
        if not isinstance(layer, ParamWrapper) or layer.num_experts <= 1 or "default" not in layer.lora_B:
            continue
        index = re.search(r"layers\.(\d+)\.", path)
        if index is None or int(index.group(1)) not in chosen:
            continue
        b_OC = layer.lora_B["default"].weight
        keep_C = torch.zeros(b_OC.shape[1], dtype=b_OC.dtype, device=b_OC.device)
        for expert in chosen[int(index.group(1))]:
            keep_C[expert::layer.num_experts] = 1.0
        with torch.no_grad():
            b_OC.mul_(keep_C)
        b_OC.register_hook(lambda grad, keep=keep_C: grad * keep)
        restricted += 1
    return restricted
