"""Variable-length attention for packed rows, registered as the transformers attention implementation "varlen".

A packed row (data/packing.py, models/packed_forward.py) holds several sequences back to back, with position ids
restarting at each. transformers' sdpa and eager kernels confine attention to each sequence with a block-diagonal
(tokens x tokens) mask: memory quadratic in the row (16 GiB of mask for a 128k-token row) and, on CUDA, no flash
kernel. "varlen" instead runs PyTorch's own `torch.nn.attention.varlen.varlen_attn` (flash attention over
cumulative sequence bounds, no mask at all) on CUDA in bf16/fp16; elsewhere (CPU, float32, attention dropout) it
runs SDPA once per sequence, which is what the tests compare on CPU.

Registered through transformers' extension points: AttentionInterface for the kernel and AttentionMaskInterface
for the mask, which is None for a packed or unpadded batch (the sequences come from the position ids, as for
flash attention) and sdpa's mask for a padded batch, which then runs transformers' sdpa kernel. A call whose rows
each hold one sequence from position 0 (no restart), or that decodes against a cache, also runs sdpa.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch

VARLEN = "varlen"
"""The attn_implementation name (model.attn_implementation: varlen)."""

_bounds_cache: tuple[weakref.ref, tuple | None] | None = None
"""(position ids tensor, its sequence bounds): every layer of one forward reads the same position ids."""


def sequence_bounds(position_ids: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens_S1 int32 over the flattened rows, longest sequence) when some row restarts its positions (holds
    packed sequences), else None. position_ids is (rows, L), or (1, L) shared by rows. Each row starts a sequence,
    and so does each position that is not its predecessor + 1. (transformers' prepare_fa_kwargs_from_position_ids
    starts sequences only where the smallest position recurs, so it cannot tell packed rows from left-padded ones.)"""
    global _bounds_cache
    if _bounds_cache is not None and _bounds_cache[0]() is position_ids:
        return _bounds_cache[1]
    position_ids_BL = position_ids.expand(rows or position_ids.shape[0], -1)
    starts_BL = torch.ones_like(position_ids_BL, dtype=torch.bool)
    starts_BL[:, 1:] = position_ids_BL[:, 1:] != position_ids_BL[:, :-1] + 1
    bounds = None
    if bool(starts_BL[:, 1:].any()):
        start_indices = starts_BL.reshape(-1).nonzero().reshape(-1)
        end = torch.tensor([position_ids_BL.numel()], device=position_ids_BL.device)
        cu_seqlens = torch.cat([start_indices, end]).to(torch.int32)
        bounds = (cu_seqlens, int(cu_seqlens.diff().max()))
    _bounds_cache = (weakref.ref(position_ids), bounds)
    return bounds


def varlen_attention_forward(module, query_BHLD, key_BHLD, value_BHLD, attention_mask, scaling=None, dropout=0.0,
                             position_ids=None, **kwargs):
    """transformers' attention interface: (attn_output_BLHD, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = (attention_mask is None and position_ids is not None and query_BHLD.shape[2] == key_BHLD.shape[2]
              and getattr(module, "is_causal", True))
    bounds = sequence_bounds(position_ids, query_BHLD.shape[0]) if packed else None
    if bounds is None:
        return sdpa_attention_forward(module, query_BHLD, key_BHLD, value_BHLD, attention_mask, scaling=scaling,
                                      dropout=dropout, position_ids=position_ids, **kwargs)
    cu_seqlens, longest = bounds
    window = getattr(module, "sliding_window", None)
    if _kernel_applies(query_BHLD, dropout, window):
        return _varlen_kernel(query_BHLD, key_BHLD, value_BHLD, cu_seqlens, longest, scaling, window), None
    return _per_sequence_sdpa(query_BHLD, key_BHLD, value_BHLD, cu_seqlens, scaling, dropout, window), None


def _kernel_applies(query_BHLD: torch.Tensor, dropout: float, window) -> bool:
    if not (query_BHLD.is_cuda and query_BHLD.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0):
        return False
    from torch.nn.attention.varlen import varlen_attn

    return not window or "window_size" in _parameters_of(varlen_attn)


@functools.lru_cache(maxsize=4)
def _parameters_of(function) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


def _flat(tensor_BHLD: torch.Tensor) -> torch.Tensor:
    """(B * L, H, D): the rows' tokens back to back, as the varlen kernel reads them."""
    batch, heads, length, dim = tensor_BHLD.shape
    return tensor_BHLD.transpose(1, 2).reshape(batch * length, heads, dim)


def _varlen_kernel(query_BHLD, key_BHLD, value_BHLD, cu_seqlens, longest: int, scaling, window):
    """varlen_attn over the flattened rows, adapted to the signature of the installed torch: torch 2.10 takes
    is_causal and neither a scale, a window nor fewer key heads; 2.11 adds scale and window_size; 2.12 enable_gqa."""
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, length, head_dim = query_BHLD.shape
    value_dim = value_BHLD.shape[-1]
    accepts = _parameters_of(varlen_attn)
    query_NHD, key_NHD, value_NHD = _flat(query_BHLD), _flat(key_BHLD), _flat(value_BHLD)
    if value_dim != head_dim:  # MLA (DeepSeek V2/V3): flash kernels need one head size; pad v, cut back
        value_NHD = torch.nn.functional.pad(value_NHD, (0, head_dim - value_dim))
    options = {}
    if key_NHD.shape[1] != heads and "enable_gqa" in accepts:
        options["enable_gqa"] = True
    elif key_NHD.shape[1] != heads:
        repeats = heads // key_NHD.shape[1]
        key_NHD, value_NHD = key_NHD.repeat_interleave(repeats, 1), value_NHD.repeat_interleave(repeats, 1)
    if "scale" in accepts:
        options["scale"] = scaling
    elif scaling is not None:  # the kernel's own scale is head_dim ** -0.5
        query_NHD = query_NHD * (scaling * head_dim ** 0.5)
    if "window_size" in accepts:
        options["window_size"] = (window - 1 if window else -1, 0)
    else:
        options["is_causal"] = True
    out_NHD = varlen_attn(query_NHD, key_NHD, value_NHD, cu_seqlens, cu_seqlens, longest, longest, **options)
    return out_NHD[..., :value_dim].reshape(batch, length, heads, value_dim)


def _per_sequence_sdpa(query_BHLD, key_BHLD, value_BHLD, cu_seqlens, scaling, dropout: float, window):
    """The fallback: causal SDPA on each sequence alone (a sliding window masks what lies further back)."""
    batch, heads, length, _ = query_BHLD.shape
    query_1HND, key_1HND, value_1HND = (t.transpose(0, 1).reshape(1, t.shape[1], batch * length, t.shape[-1])
                                        for t in (query_BHLD, key_BHLD, value_BHLD))
    outputs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        mask = None
        if window:
            positions = torch.arange(end - start, device=query_BHLD.device)
            distance = positions[:, None] - positions[None, :]
            mask = (distance >= 0) & (distance < window)
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            query_1HND[:, :, start:end], key_1HND[:, :, start:end], value_1HND[:, :, start:end], attn_mask=mask,
            dropout_p=dropout, is_causal=mask is None, scale=scaling, enable_gqa=key_BHLD.shape[1] != heads))
    out_1HND = torch.cat(outputs, dim=2)
    return out_1HND.reshape(heads, batch, length, -1).permute(1, 2, 0, 3)


def _varlen_mask(*args, attention_mask=None, **kwargs):
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register "varlen" with transformers (idempotent); returns the name for attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    return VARLEN


def varlen_kernel_available() -> bool:
    """Whether torch ships the varlen flash kernel (torch.nn.attention.varlen, torch 2.10+)."""
    import importlib.util

    return importlib.util.find_spec("torch.nn.attention.varlen") is not None
