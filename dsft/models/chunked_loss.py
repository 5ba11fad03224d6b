"""Causal-LM loss from the final hidden states, in chunks of tokens: the [tokens, vocab] logits are never held whole.

The model's own loss projects every position through the lm_head and upcasts the logits to float32: for a
152k vocabulary and 16k tokens that is 10 GB before its gradient, often the largest tensor of a step. Here only the
positions whose next-token label is not -100 are scored, loss_chunk_tokens at a time. For each chunk the logits,
their log-sum-exp and the chunk's gradients with respect to the hidden states and the head weight are formed at
once (the loss is a scalar, so its gradient is known in the forward pass; the approach of Liger Kernel's fused
linear cross entropy, in plain torch), then the chunk's logits are freed. Peak memory is one chunk's logits and
nothing is recomputed in the backward, which only scales the stored gradients.

The value equals transformers' ForCausalLMLoss: labels shifted left, -100 ignored, the sum of the token losses
divided by num_items_in_batch (the Trainer's count over all accumulated micro-batches) or else by the number of
scored tokens; packed rows need nothing more, since their collator masks each sample's first label
(tests/unit/test_chunked_loss.py).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def chunked_lm_loss(model, inputs: dict, chunk_tokens: int, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss of model on inputs ({"input_ids", "labels", ...} as the Trainer passes them), computed
    from the decoder's hidden states and the lm_head weight in chunks of chunk_tokens scored positions.

    model may be a PeftModel, and either may be wrapped for data parallelism (DDP, a DeepSpeed ZeRO-2 engine, FSDP2):
    the forward runs through the wrapper, as its gradient synchronisation requires. The loss is formed inside the
    lm_head's call (where FSDP2 holds the weight whole), from the hidden states it receives, and the head then
    projects an empty slice, so no logits are made. Raises ValueError when the lm_head is not a plain linear layer (LoRA on the lm_head); resolve_speed_plan
    keeps the loss off then.
    """
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    base = inner.get_base_model() if hasattr(inner, "peft_config") else inner
    head = plain_linear_head(base.get_output_embeddings())
    if head is None:
        raise ValueError("the chunked loss needs a plain linear lm_head (not adapted by LoRA)")
    losses: list[torch.Tensor] = []

    def score_then_project_nothing(module, args):
        if losses:
            raise RuntimeError("the lm_head ran twice in one forward: the chunked loss cannot tell which call scores")
        losses.append(chunked_linear_cross_entropy(args[0], module.weight, module.bias, inputs["labels"], chunk_tokens,
                                                   num_items_in_batch, inputs.get("shift_labels")))
        return (args[0][..., :0, :],)

    forward_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    forward_inputs.setdefault("use_cache", False)  # a training forward needs no KV cache
    handle = head.register_forward_pre_hook(score_then_project_nothing)
    try:
        model(**forward_inputs)
    finally:
        handle.remove()
    return losses[0]


def plain_linear_head(head):
    """The torch.nn.Linear that computes the logits: head itself, or the trained copy PEFT keeps for an lm_head in
    modules_to_save; None for anything else (a LoRA layer, whose output is not weight @ x alone)."""
    if isinstance(head, torch.nn.Linear):
        return head
    copies = getattr(head, "modules_to_save", None)
    if copies is None:
        return None
    if getattr(head, "disable_adapters", False):
        return plain_linear_head(head.original_module)
    active = head.active_adapters[0] if getattr(head, "active_adapters", None) else None
    return plain_linear_head(copies[active]) if active in copies else plain_linear_head(head.original_module)


def chunked_linear_cross_entropy(hidden_BTD, weight_VD, bias_V, labels_BT, chunk_tokens: int,
                                 num_items_in_batch=None, shift_labels_BT=None) -> torch.Tensor:
    """Mean next-token cross entropy of logits = hidden @ weight.T + bias, as transformers' ForCausalLMLoss computes
    it (see the module docstring), holding at most chunk_tokens rows of logits at a time.

    With no scored token the loss is 0 (connected to the graph), where the model's own mean would be NaN.
    """
    if shift_labels_BT is None:
        hidden_BTD, shift_labels_BT = hidden_BTD[:, :-1], labels_BT[:, 1:]
    shift_labels_BT = shift_labels_BT.to(hidden_BTD.device)
    scored_BT = shift_labels_BT != IGNORE_INDEX
    if num_items_in_batch is None:
        num_items_in_batch = scored_BT.sum().clamp(min=1)
    # Kept a tensor: converting a device count to a float would wait for the GPU at every micro-batch.
    scale = 1.0 / torch.as_tensor(num_items_in_batch, device=hidden_BTD.device, dtype=torch.float32)
    # Under autocast the head's matmul runs in the autocast dtype, as it does inside the model's own forward.
    device_type = hidden_BTD.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight_VD.dtype
    bias_V = None if bias_V is None else bias_V.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden_BTD[scored_BT].to(dtype), weight_VD.to(dtype), bias_V,
                                                shift_labels_BT[scored_BT], chunk_tokens, scale)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of -log softmax(hidden_ND @ weight_VD.T + bias_V)[targets_N], times scale.

    The gradients are computed chunk by chunk in the forward and stored; backward multiplies them by the incoming
    gradient (a scalar). The head weight's gradient accumulates in float32 across chunks.
    """

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, targets_N, chunk_tokens, scale):
        wants_hidden, wants_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wants_bias = bias_V is not None and ctx.needs_input_grad[2]
        grad_hidden_ND = torch.empty_like(hidden_ND) if wants_hidden else None
        grad_weight_VD = torch.zeros_like(weight_VD, dtype=torch.float32) if wants_weight else None
        grad_bias_V = torch.zeros_like(bias_V, dtype=torch.float32) if wants_bias else None
        loss_sum = torch.zeros((), device=hidden_ND.device, dtype=torch.float32)
        for start in range(0, hidden_ND.shape[0], chunk_tokens):
            hidden_CD = hidden_ND[start:start + chunk_tokens]
            targets_C = targets_N[start:start + chunk_tokens]
            logits_CV = torch.nn.functional.linear(hidden_CD, weight_VD, bias_V).float()
            logsumexp_C = torch.logsumexp(logits_CV, dim=-1)
            loss_sum += (logsumexp_C - logits_CV.gather(1, targets_C[:, None]).squeeze(1)).sum()
            if not (wants_hidden or wants_weight or wants_bias):
                continue
            # d loss / d logits = softmax - one_hot(target), formed in place over the chunk's logits.
            grad_logits_CV = logits_CV.sub_(logsumexp_C[:, None]).exp_()
            grad_logits_CV[torch.arange(targets_C.shape[0], device=targets_C.device), targets_C] -= 1.0
            grad_logits_CV.mul_(scale)
            if wants_bias:
                grad_bias_V += grad_logits_CV.sum(0)
            grad_logits_CV = grad_logits_CV.to(hidden_CD.dtype)
            if wants_hidden:
                grad_hidden_ND[start:start + chunk_tokens] = grad_logits_CV @ weight_VD
            if wants_weight:
                grad_weight_VD += grad_logits_CV.t() @ hidden_CD
        ctx.save_for_backward(grad_hidden_ND, grad_weight_VD, grad_bias_V)
        ctx.dtypes = (weight_VD.dtype, None if bias_V is None else bias_V.dtype)
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden_ND, grad_weight_VD, grad_bias_V = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        grad_hidden_ND = None if grad_hidden_ND is None else grad_hidden_ND * grad_loss.to(grad_hidden_ND.dtype)
        grad_weight_VD = None if grad_weight_VD is None else (grad_weight_VD * grad_loss).to(weight_dtype)
        grad_bias_V = None if grad_bias_V is None else (grad_bias_V * grad_loss).to(bias_dtype)
        return grad_hidden_ND, grad_weight_VD, grad_bias_V, None, None, None
