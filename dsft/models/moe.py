"""Mixture-of-experts routing, seen from outside the model: the routers of a transformers MoE model, the load they
put on each expert (counted by forward hooks, PyTorch's extension point; no model code is replaced), DeepSeek's
balancing rules and the load statistics dsft reports.

Every transformers MoE router (DeepSeek V2/V3/V3.2/V4, Qwen-MoE, Mixtral, ...) is a module named *Router with top_k
and num_experts that returns (router_logits, top-k weights, top-k expert indices). The indices say where each token
went; the logits, turned into the router's scores, feed the auxiliary losses.

Which forwards count. ExpertLoads counts a forward of the decoder while it is armed: in "train" mode, a forward that
runs with gradients (the training forward; generation, reference models and evaluation run without); in "all" mode,
every forward (a profiling or evaluation pass). The decoder's pre-hook arms it and reads the attention mask, its
post-hook disarms it, so the routers' second forward under gradient checkpointing (inside the backward) is never
counted twice. Only real tokens count: the mask drops padding (a packed body has none).

Balancing rules (DeepSeek-V2 section 2.2.2 and DeepSeek-V3 section 2.1.2):
- bias update (V3): b_i <- b_i + gamma * sign(mean_j load_j - load_i) per layer, after each optimizer step, from the
  step's loads; the bias only shifts which experts are chosen, never the weights the chosen ones get.
- expert-level loss: alpha_1 * sum_i f_i P_i, f_i = E / (k T) * (pairs routed to i), P_i = mean over tokens of the
  normalised score s'_i (softmax, or sigmoid scores divided by their sum as V3 normalises);
- device-level loss: alpha_2 * sum_d f'_d P'_d over D groups of E / D experts (f' the mean f, P' the sum of P);
- communication loss: alpha_3 * sum_d f''_d P'_d, f''_d = D / (M T) * (tokens sent to group d), M = groups a token
  may reach (the router's topk_group, else min(k, D));
- sequence-wise loss (V3): the expert-level loss within each sequence, averaged over the sequences.
Every loss is summed over the MoE layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

ORIGINAL_MODULE = ".original_module"
"""PEFT keeps a modules_to_save module's untouched original under this name; the trained copy is the one that runs."""


@dataclass(frozen=True)
class Router:
    layer: int
    """Decoder layer index."""
    path: str
    module: torch.nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.module.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.module.top_k)

    @property
    def has_bias(self) -> bool:
        """Whether it routes with DeepSeek-V3's correction bias (a buffer, e_score_correction_bias)."""
        return isinstance(getattr(self.module, "e_score_correction_bias", None), torch.Tensor)

    @property
    def hashed(self) -> bool:
        """DeepSeek-V4's hash routing: experts chosen by a frozen token table, whatever the gate scores."""
        return hasattr(self.module, "tid2eid")


def find_routers(model) -> list[Router]:
    """The routers of model (PEFT-wrapped or not) in layer order; [] for a dense model."""
    routers = []
    for path, module in model.named_modules():
        if ORIGINAL_MODULE in path or not _is_router(module):
            continue
        layer = re.search(r"layers\.(\d+)\.", path)
        routers.append(Router(int(layer.group(1)) if layer else len(routers), path, module))
    return sorted(routers, key=lambda router: router.layer)


def _is_router(module) -> bool:
    return type(module).__name__.endswith("Router") and hasattr(module, "top_k") and hasattr(module, "num_experts")


def decoder_of(model):
    """The module holding the decoder layers (its forward sees the attention mask); None when there is none."""
    for path, module in model.named_modules():
        if ORIGINAL_MODULE not in path and isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
            return module
    return None


def router_scores(module, logits_NE: torch.Tensor) -> torch.Tensor:
    """The router's per-expert scores normalised to sum 1 per token: softmax routers (V2, Mixtral, Qwen) as they
    are, sigmoid ones (V3, V3.2) and V4's score function divided by their sum."""
    logits_NE = logits_NE.float()
    score_fn = getattr(module, "score_fn", None)
    if score_fn is not None:
        scores_NE = score_fn(logits_NE)
    elif isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
        scores_NE = logits_NE.sigmoid()
    else:
        return logits_NE.softmax(dim=-1)
    return scores_NE / (scores_NE.sum(dim=-1, keepdim=True) + 1e-20)


@dataclass
class Routed:
    """What one router did in one forward: logits [N, E] (with their graph), indices [N, k], the real-token mask
    [N] (float, 1 real) and the sequence layout (rows, tokens per row) when known."""

    logits: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor
    rows: tuple[int, int] | None


class ExpertLoads:
    """Per MoE layer and expert, the (token, expert) pairs routed while armed: counts_LE, on the model's device."""

    def __init__(self, model, mode: str = "train", keep_routed: bool = False):
        self.routers = find_routers(model)
        self.mode = mode
        """train: count forwards run with gradients; all: every forward; off: none (the hooks stay)."""
        self.keep_routed = keep_routed
        """Keep each router's Routed of the last forward (for the auxiliary losses); read and cleared by take_routed."""
        self.routed: list[Routed] = []
        self.counts_LE: torch.Tensor | None = None
        self.armed = False
        self._mask_BL: torch.Tensor | None = None
        self._handles = []
        decoder = decoder_of(model)
        if decoder is not None and self.routers:
            self._handles.append(decoder.register_forward_pre_hook(self._arm, with_kwargs=True))
            self._handles.append(decoder.register_forward_hook(self._disarm))
        for slot, router in enumerate(self.routers):
            self._handles.append(router.module.register_forward_hook(self._counter(slot)))

    @property
    def layers(self) -> list[int]:
        return [router.layer for router in self.routers]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take_counts(self, reduce=None) -> torch.Tensor:
        """The counts so far as int64 [layers, experts] on the CPU, and a fresh start; reduce (e.g. a sum over
        ranks, in place) runs on them first, on the model's device."""
        counts = self._zeros(self._device()) if self.counts_LE is None else self.counts_LE
        self.counts_LE = None
        if reduce is not None:
            reduce(counts)
        return counts.cpu()

    def _device(self):
        return next(iter(self.routers[0].module.parameters()), torch.empty(0)).device

    def take_routed(self) -> list[Routed]:
        routed, self.routed = self.routed, []
        return routed

    def _zeros(self, device) -> torch.Tensor:
        width = max(router.num_experts for router in self.routers)
        return torch.zeros(len(self.routers), width, dtype=torch.long, device=device)

    def _arm(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask_BL = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        self.armed = self.mode == "all" or (self.mode == "train" and torch.is_grad_enabled() and module.training)

    def _disarm(self, module, args, output):
        self.armed = False
        self._mask_BL = None

    def _counter(self, slot: int):
        def hook(module, args, output):
            if self.armed:
                self._count(slot, module, output)
        return hook

    def _count(self, slot: int, module, output) -> None:
        logits, indices_Nk = output[0], output[2]
        tokens = indices_Nk.shape[0]
        mask_N, rows = self._token_mask(tokens, indices_Nk.device)
        if self.counts_LE is None:
            self.counts_LE = self._zeros(indices_Nk.device)
        # index_add_ of the mask (no boolean indexing): no device synchronisation per layer.
        weights_Nk = mask_N.long().unsqueeze(-1).expand_as(indices_Nk)
        self.counts_LE[slot].index_add_(0, indices_Nk.reshape(-1).long(), weights_Nk.reshape(-1))
        if self.keep_routed:
            self.routed.append(Routed(logits.view(tokens, -1), indices_Nk, mask_N.float(), rows))

    def _token_mask(self, tokens: int, device) -> tuple[torch.Tensor, tuple[int, int] | None]:
        mask = self._mask_BL
        if mask is not None and mask.numel() == tokens:
            return mask.reshape(-1).to(device=device, dtype=torch.bool), tuple(mask.shape)
        # No mask, or a packed body that runs only the real tokens: every routed token is real.
        return torch.ones(tokens, dtype=torch.bool, device=device), None


def bias_update(bias_E: torch.Tensor, loads_E: torch.Tensor, speed: float) -> torch.Tensor:
    """DeepSeek-V3's rule: the bias after one step, each expert's moved by speed toward balance."""
    loads = loads_E.to(torch.float64)
    step = torch.sign(loads.mean() - loads) * speed
    return (bias_E.to(torch.float64) + step).to(bias_E.dtype)


def apply_bias_updates(routers: list[Router], counts_LE: torch.Tensor, speed: float) -> int:
    """bias_update on every router that has the bias, in place; returns how many moved (no tokens: none)."""
    moved = 0
    for slot, router in enumerate(routers):
        loads_E = counts_LE[slot, : router.num_experts]
        if not router.has_bias or int(loads_E.sum()) == 0:
            continue
        bias = router.module.e_score_correction_bias
        with torch.no_grad():
            bias.copy_(bias_update(bias, loads_E.to(bias.device), speed))
        moved += 1
    return moved


def load_stats(counts_LE: torch.Tensor, routers: list[Router]) -> list[dict]:
    """Per layer: tokens x k routed pairs, each expert's share, imbalance (max share / mean share), coefficient of
    variation (std / mean, population) and cold experts (share under 10% of the mean)."""
    stats = []
    for slot, router in enumerate(routers):
        loads = counts_LE[slot, : router.num_experts].to(torch.float64)
        total = float(loads.sum())
        share = loads / total if total else torch.zeros_like(loads)
        mean = 1.0 / router.num_experts
        stats.append({
            "layer": router.layer,
            "routed_pairs": int(total),
            "share": [round(float(s), 6) for s in share],
            "imbalance": round(float(share.max()) / mean, 4) if total else None,
            "cv": round(float(share.std(unbiased=False)) / mean, 4) if total else None,
            "cold_experts": int((share < 0.1 * mean).sum()) if total else None,
        })
    return stats


def window_summary(stats: list[dict]) -> dict:
    """The compact numbers of one window for metrics.jsonl: the worst layer's imbalance, the mean coefficient of
    variation over layers, and the cold experts of all layers."""
    counted = [layer for layer in stats if layer["routed_pairs"]]
    if not counted:
        return {}
    return {
        "moe_load_imbalance": max(layer["imbalance"] for layer in counted),
        "moe_load_cv": round(sum(layer["cv"] for layer in counted) / len(counted), 4),
        "moe_cold_experts": sum(layer["cold_experts"] for layer in counted),
    }


def most_loaded(counts_LE: torch.Tensor, routers: list[Router], per_layer: int) -> dict[int, list[int]]:
    """The per_layer most loaded experts of each layer (ties: the lower index first), by layer index."""
    chosen = {}
    for slot, router in enumerate(routers):
        loads = counts_LE[slot, : router.num_experts].tolist()
        order = sorted(range(router.num_experts), key=lambda e: (-loads[e], e))
        chosen[router.layer] = sorted(order[:per_layer])
    return chosen


def balance_losses(routed: list[Routed], routers: list[Router], aux) -> torch.Tensor | None:
    """The auxiliary losses (aux: config AuxLossConfig) of one forward, summed over its MoE layers; None when no
    router ran. Hash-routed layers are left out: no gradient can change where they send a token."""
    total = None
    for item, router in zip(routed, routers):
        if router.hashed:
            continue
        loss = _layer_losses(item, router, aux)
        total = loss if total is None else total + loss
    return total


def _layer_losses(item: Routed, router: Router, aux) -> torch.Tensor:
    scores_NE = router_scores(router.module, item.logits)
    chosen_NE = torch.zeros_like(scores_NE).scatter_(1, item.indices.long(), 1.0)
    mask_N = item.mask.to(scores_NE.device)
    loss = scores_NE.new_zeros(())
    if aux.expert or aux.device or aux.communication:
        f_E, p_E = _balance_terms(scores_NE, chosen_NE, mask_N, router.top_k)
        loss = loss + aux.expert * (f_E * p_E).sum()
        if aux.device or aux.communication:
            loss = loss + _device_losses(f_E, p_E, chosen_NE, mask_N, router, aux)
    if aux.sequence:
        loss = loss + aux.sequence * _sequence_loss(scores_NE, chosen_NE, mask_N, item.rows, router.top_k)
    return loss


def _balance_terms(scores_NE, chosen_NE, mask_N, top_k: int):
    """f_i (routed share, scaled so 1 is balance) and P_i (mean normalised score) over the real tokens."""
    tokens = mask_N.sum().clamp(min=1.0)
    experts = scores_NE.shape[-1]
    f_E = (chosen_NE * mask_N[:, None]).sum(0) * experts / (top_k * tokens)
    p_E = (scores_NE * mask_N[:, None]).sum(0) / tokens
    return f_E, p_E


def _device_losses(f_E, p_E, chosen_NE, mask_N, router: Router, aux) -> torch.Tensor:
    groups = aux.devices
    f_DG, p_DG = f_E.view(groups, -1), p_E.view(groups, -1)
    group_p_D = p_DG.sum(-1)
    loss = aux.device * (f_DG.mean(-1) * group_p_D).sum()
    if aux.communication:
        reached = getattr(router.module, "topk_group", None) or min(router.top_k, groups)
        sent_ND = chosen_NE.view(chosen_NE.shape[0], groups, -1).amax(-1)
        tokens = mask_N.sum().clamp(min=1.0)
        f_D = (sent_ND * mask_N[:, None]).sum(0) * groups / (reached * tokens)
        loss = loss + aux.communication * (f_D * group_p_D).sum()
    return loss


def _sequence_loss(scores_NE, chosen_NE, mask_N, rows, top_k: int) -> torch.Tensor:
    """V3's sequence-wise loss: the expert-level form within each sequence (the micro-batch as one sequence when
    its rows are not known, e.g. a packed body), averaged over the sequences that have real tokens."""
    batch, length = rows if rows is not None else (1, scores_NE.shape[0])
    scores_BLE = scores_NE.view(batch, length, -1)
    chosen_BLE = chosen_NE.view(batch, length, -1)
    mask_BL = mask_N.view(batch, length)
    tokens_B = mask_BL.sum(-1)
    experts = scores_NE.shape[-1]
    f_BE = (chosen_BLE * mask_BL[..., None]).sum(1) * experts / (top_k * tokens_B.clamp(min=1.0))[:, None]
    p_BE = (scores_BLE * mask_BL[..., None]).sum(1) / tokens_B.clamp(min=1.0)[:, None]
    per_sequence_B = (f_BE * p_BE).sum(-1)
    present_B = (tokens_B > 0).float()
    return (per_sequence_B * present_B).sum() / present_B.sum().clamp(min=1.0)


def route_sequences(model, sequences: list[list[int]], batch_size: int) -> torch.Tensor:
    """counts_LE of routing sequences (token ids) through the model's decoder, without gradient, in eval mode (the
    model's mode is restored); rows padded on the right under an attention mask, batch_size rows at a time (1 for
    an architecture that must never see padding)."""
    from dsft.models.families import family_of, model_type_of

    decoder = decoder_of(model)
    loads = ExpertLoads(model, mode="all")
    if family_of(model_type_of(model)).padding_blocker is not None:
        batch_size = 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                ids_BL, mask_BL = _padded(sequences[start: start + batch_size], device)
                decoder(input_ids=ids_BL, attention_mask=mask_BL, use_cache=False)
        return loads.take_counts()
    finally:
        loads.remove()
        model.train(was_training)


def _padded(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids_BL = torch.zeros(len(rows), width, dtype=torch.long)
    mask_BL = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        ids_BL[index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask_BL[index, : len(row)] = 1
    return ids_BL.to(device), mask_BL.to(device)


def row_sequence(row) -> list[int] | None:
    """The token ids a training row routes: a sample's input_ids, a preference pair's prompt and chosen answer, a
    KTO row's prompt and completion, an RL prompt; None when the row has none."""
    if "input_ids" in row:
        return list(map(int, row["input_ids"]))
    prompt = row.get("prompt_input_ids", row.get("prompt_ids"))
    if prompt is None:
        return None
    answer = row.get("chosen_input_ids", row.get("completion_input_ids", []))
    return [*map(int, prompt), *map(int, answer)]
