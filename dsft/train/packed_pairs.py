"""Padding-free DPO: each padded batch of chosen and rejected sequences runs through the model as one packed row.

TRL 1.16's DPOTrainer turns DPOConfig.padding_free off with a warning ("temporarily unavailable after a refactor"),
so dsft packs below TRL instead of beside it. TRL gives the model instance a fused LM head
(trl.trainer.utils.add_fused_lm_head: `model(..., labels=..., fused_lm_head=True)` returns per-token
log-probabilities); pack_padded_forward wraps that one instance's forward, as TRL's own head does:
- the real tokens of the batch's rows go back to back into one row, position ids restarting at each sequence;
  with no attention mask, transformers turns restarting position ids into attention confined to each sequence
  (a block-diagonal causal mask for eager and sdpa, varlen kernels for flash attention);
- the first label of each sequence is masked, so no log-probability is read across a sequence boundary;
- the per-token outputs are scattered back into the padded (rows, length - 1) layout TRL's loss reads.
TRL's loss, reference pass and metrics are untouched and see the shapes they would see padded; the model
computes no padding token. tests/unit/test_packed_pairs.py checks loss and gradients against the padded step.
"""

from __future__ import annotations

import functools
import types

import torch

from dsft.models.families import refuse_packing
from dsft.models.packed_forward import packed_positions, unpack_tokens

IGNORE_INDEX = -100


def pack_rows(input_ids_RL: torch.Tensor, attention_mask_RL: torch.Tensor, labels_RL: torch.Tensor):
    """(input_ids_1N, position_ids_1N, labels_1N): the real (mask 1, right-padded) tokens of every row back to back,
    positions restarting at each row, the first label of each row ignored (it would be predicted from the row before)."""
    real_RL = attention_mask_RL.bool()
    position_ids_1N = packed_positions(attention_mask_RL)
    labels_1N = labels_RL[real_RL].unsqueeze(0).masked_fill(position_ids_1N == 0, IGNORE_INDEX)
    return input_ids_RL[real_RL].unsqueeze(0), position_ids_1N, labels_1N


def unpack_per_token(values_1M: torch.Tensor, attention_mask_RL: torch.Tensor) -> torch.Tensor:
    """Per-token values of the packed row (M = N - 1 next-token predictions) in the padded (R, L - 1) layout,
    zero where the padded forward has no label; differentiable (masked_scatter)."""
    # Packed prediction p reads token p + 1; appending one value makes index p line up with token p of its row.
    values_1N = torch.cat([values_1M, values_1M.new_zeros(1, 1)], dim=1)
    return unpack_tokens(values_1N, attention_mask_RL)[:, :-1]


def pack_padded_forward(model) -> None:
    """Make model (carrying TRL's fused LM head) run each fused_lm_head=True call packed, as the module docstring says.
    Other calls (generation, plain forwards) are unchanged."""
    fused_forward = model.forward

    @functools.wraps(type(model).forward)
    def packed_forward(self, *args, fused_lm_head=False, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if not fused_lm_head or attention_mask is None or args or kwargs.get("position_ids") is not None:
            return fused_forward(*args, fused_lm_head=fused_lm_head, input_ids=input_ids,
                                 attention_mask=attention_mask, labels=labels, **kwargs)
        packed_ids, position_ids, packed_labels = pack_rows(input_ids, attention_mask, labels)
        outputs = fused_forward(input_ids=packed_ids, position_ids=position_ids, labels=packed_labels,
                                fused_lm_head=True, **kwargs)
        for name, value in outputs.items():
            if torch.is_tensor(value) and value.shape == packed_labels[:, 1:].shape:
                outputs[name] = unpack_per_token(value, attention_mask)
        return outputs

    model.forward = types.MethodType(packed_forward, model)


def pack_trainer_forwards(trainer) -> None:
    """pack_padded_forward on each model a DPOTrainer gave a fused LM head: the policy (under a PEFT wrapper, its base
    model, whose adapter-disabled pass is also the reference) and the reference model when there is one."""
    from peft import PeftModel

    policy = trainer.model
    refuse_packing(policy, True)
    pack_padded_forward(policy.get_base_model() if isinstance(policy, PeftModel) else policy)
    if trainer.ref_model is not None:
        pack_padded_forward(trainer.ref_model)
