"""prune-experts of `dsft compress`: drop the least-used routed experts of every MoE layer, counted by dsft's
expert-load telemetry (dsft/models/moe.py) on the calibration data, and cut the router with them.

Per MoE layer the drop_experts experts that received the fewest tokens go: their rows of every expert tensor
(transformers stores them fused, [E, ...]), of the router's gate weight and of its correction bias; the kept
experts keep their order, and the router picks its top-k among them and renormalises as it always does. The same
number goes in every layer (the config holds one expert count). Shared experts stay. Refused: a dense model,
hash-routed layers (DeepSeek-V4: a frozen token table names the experts), group-limited routing whose group count
would not divide the experts left, and keeping fewer experts than a token picks.
"""

from __future__ import annotations

import torch

from dsft.errors import DsftError
from dsft.models.moe import find_routers, route_sequences

EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


def prune_experts(model, drop: int, calibration: list[list[int]]) -> dict:
    """Drop drop experts per MoE layer, the least loaded on calibration; returns the loads and what was kept."""
    routers = find_routers(model)
    if not routers:
        raise DsftError("prune-experts: the model has no MoE layers (no routers); it applies to MoE models")
    if any(router.hashed for router in routers):
        raise DsftError("prune-experts: hash-routed layers (DeepSeek-V4) choose experts by a token table; dropping "
                        "experts would cut tokens off. Not supported")
    experts = routers[0].num_experts
    keep = experts - drop
    _check_keep(model.config, routers, keep, drop)
    counts_LE = route_sequences(model, calibration, 8)
    loads = {router.layer: counts_LE[i, : router.num_experts].tolist() for i, router in enumerate(routers)}
    kept_per_layer = {}
    for router, counts_E in zip(routers, counts_LE):
        kept = sorted(torch.argsort(counts_E[: router.num_experts], descending=True, stable=True)[:keep].tolist())
        _cut_layer(model, router, torch.tensor(kept))
        kept_per_layer[router.layer] = kept
    for key in EXPERT_COUNT_KEYS:
        if getattr(model.config, key, None) == experts:
            setattr(model.config, key, keep)
    return {"experts_before": experts, "experts_after": keep, "kept_experts": kept_per_layer,
            "calibration_loads": loads}


def _check_keep(config, routers, keep: int, drop: int) -> None:
    top_k = routers[0].top_k
    if keep < max(top_k, 1):
        raise DsftError(f"compress.drop_experts {drop}: {routers[0].num_experts} experts per layer leave {keep}, "
                        f"fewer than the {top_k} each token picks")
    groups = getattr(config, "n_group", None) or 1
    if keep % groups:
        raise DsftError(f"compress.drop_experts {drop}: the router picks among {groups} expert groups (n_group), "
                        f"which must divide the {keep} experts left; drop a multiple of {groups}")


def _cut_layer(model, router, kept: torch.Tensor) -> None:
    """Keep rows kept of the router's per-expert tensors and of the MoE block's experts module."""
    block = model.get_submodule(router.path.rsplit(".", 1)[0])
    experts_module = getattr(block, "experts", None)
    if isinstance(experts_module, torch.nn.ModuleList):
        raise DsftError("prune-experts: this architecture keeps its experts as separate modules; only fused expert "
                        "tensors (DeepSeek V2/V3 in transformers 5) are supported")
    count = router.num_experts
    for module in (router.module, experts_module):
        if module is None:
            continue
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.dim() >= 1 and tensor.shape[0] == count:
                cut = tensor.data[kept].clone()
                if isinstance(tensor, torch.nn.Parameter):
                    setattr(module, name, torch.nn.Parameter(cut, requires_grad=tensor.requires_grad))
                else:
                    module.register_buffer(name, cut)
        if hasattr(module, "num_experts"):
            module.num_experts = len(kept)
