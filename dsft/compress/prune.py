"""Pruning methods of `dsft compress`, on a loaded Hugging Face causal LM, in place.

prune-magnitude zeroes the smallest-magnitude weights of every linear layer inside the decoder layers (attention
and MLP projections, MoE experts stored as linear layers; never embeddings, norms, routers or lm_head), a sparsity
share per matrix. Experts stored fused (one 3-D tensor per layer, DeepSeek-V3 in transformers 5) are not linear
layers and are left whole. The zeros are stored densely, so the file does not shrink: the report says so.

prune-layers removes whole decoder layers, the ones whose output differs least from their input on the
calibration data (block influence, 1 - cosine similarity of a layer's input and output hidden states averaged
over the calibration tokens, as ShortGPT measures it). The config's per-layer lists shrink with the layers, and
the result is checked by loading it back: a model whose architecture assigns layer kinds by position (DeepSeek's
first_k_dense_replace) and would rebuild differently is refused.
"""

from __future__ import annotations

import torch

from dsft.errors import DsftError


def magnitude_prune(model, sparsity: float) -> dict:
    """Zero the sparsity share of smallest |w| in each decoder linear layer; returns what was pruned."""
    layers = decoder_layers(model)
    pruned, total = 0, 0
    for layer in layers:
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.endswith((".gate", "router")):
                continue  # an MoE router stored as a linear layer: its few rows decide every token's experts
            weight = module.weight.data
            count = int(weight.numel() * sparsity)
            if count == 0:
                continue
            threshold = weight.abs().flatten().kthvalue(count).values
            mask = weight.abs() <= threshold
            weight[mask] = 0
            pruned, total = pruned + int(mask.sum()), total + weight.numel()
    if total == 0:
        raise DsftError("prune-magnitude: the model's decoder layers hold no linear layers to prune")
    return {"pruned_weights": pruned, "decoder_linear_weights": total, "sparsity_reached": pruned / total}


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of a causal LM (model.model.layers in every family dsft trains); raises DsftError."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise DsftError(f"{type(model).__name__}: no decoder layer list (model.model.layers) to prune")
    return layers


def block_influence(model, calibration: list[list[int]]) -> list[float]:
    """Per decoder layer, 1 - mean cosine similarity of its input and output hidden states over the calibration
    tokens (the last layer's output as the model returns it, after the final norm)."""
    count = len(decoder_layers(model))
    sums, tokens = torch.zeros(count, dtype=torch.float64), 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for ids in calibration:
            states = model(torch.tensor([ids], device=device), output_hidden_states=True).hidden_states
            for i in range(count):
                similarity = torch.nn.functional.cosine_similarity(states[i][0].double(), states[i + 1][0].double(),
                                                                   dim=-1)
                sums[i] += (1 - similarity).sum().cpu()
            tokens += len(ids)
    return (sums / tokens).tolist()


def drop_layers(model, count: int, influence: list[float]) -> dict:
    """Remove the count layers of lowest influence (ties: the later layer); renumber the rest and shrink the
    config's per-layer lists. Raises DsftError when fewer than count + 1 layers exist."""
    layers = decoder_layers(model)
    if count >= len(layers):
        raise DsftError(f"compress.drop_layers {count}: the model has {len(layers)} decoder layers; keep at least one")
    order = sorted(range(len(layers)), key=lambda i: (influence[i], -i))
    dropped = sorted(order[:count])
    kept = [i for i in range(len(layers)) if i not in dropped]
    model.model.layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache is indexed by position in the list
    _shrink_config(model.config, len(layers), kept)
    return {"dropped_layers": dropped, "kept_layers": len(kept), "block_influence": influence}


def _shrink_config(config, old_count: int, kept: list[int]) -> None:
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old_count and key != "architectures":
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
