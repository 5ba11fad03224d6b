"""Speed switches: train.liger, chunked_loss, experts, fused_optimizer, compile and checkpointing, each resolved from
auto to a concrete choice for this machine and model (a SpeedPlan, logged at startup and saved in summary.json) and
applied through the libraries' own extension points. Every switch has a CPU fallback, and tests prove that each
leaves the loss unchanged (tests/unit/test_speed_switches.py).

What auto resolves to:
- liger: on with CUDA, liger-kernel installed and a dense architecture it covers (LIGER_ARCHITECTURES): its RMSNorm,
  RoPE and SwiGLU kernels, applied with Liger's own API (which patches transformers' modeling module of that
  architecture for the whole process). The loss stays dsft's chunked loss. DeepSeek V2/V3 stay off: Liger swaps
  their routed experts for its own module, bypassing transformers' experts kernels and PEFT's LoRA on them.
- chunked_loss: on with CUDA; off on CPU, where the model's own loss is the fallback. Refused when the model adds
  what the chunked loss does not compute (a router auxiliary loss, logit soft-capping), LoRA adapts the lm_head, or
  several processes train under DeepSpeed ZeRO-3 (see _sharded_head_blocker); it runs under DDP, ZeRO-2 and FSDP2.
- experts (MoE models with fused experts only): grouped_mm where torch has a grouped GEMM for the device (CUDA
  compute capability 8.0+, or CPU with torch 2.9+), else eager. dsft's grouped_mm also computes LoRA on the routed
  experts as grouped low-rank products (moe_lora.py).
- fused_optimizer: on (torch's fused AdamW exists for CUDA and CPU; transformers' own default since torch 2.8).
- attention (with train.packing only, and only where model.attn_implementation is not set): on CUDA,
  flash_attention_2 where flash-attn is installed, else dsft's varlen (PyTorch's varlen flash kernel,
  varlen_attention.py), so packed rows need no tokens x tokens mask; on CPU the model's own kernel (sdpa with
  transformers' block-diagonal mask).
- compile: as configured; each decoder layer is compiled in place (nn.Module.compile), so the chunked loss, which
  calls the decoder directly, runs compiled layers too.
- checkpointing (with gradient_checkpointing only): transformers' activation checkpointing of every decoder layer;
  selective saves the attention kernels' outputs (torch's selective activation checkpointing) so the backward
  recomputes everything but attention; offload also holds what the recompute needs in pinned CPU memory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from dsft.config import TrainConfig
from dsft.errors import DsftError
from dsft.models.families import family_of

LIGER_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
"""model_type values whose Liger kernels dsft applies with liger: auto."""


@dataclasses.dataclass(frozen=True)
class SpeedPlan:
    """The concrete speed switches of one run."""

    liger: bool
    chunked_loss: bool
    loss_chunk_tokens: int
    experts: str | None
    """eager, grouped_mm or batched_mm; None for a model without fused MoE experts."""
    fused_optimizer: bool
    compile: bool
    checkpointing: str
    """off, full, selective or offload."""
    attention: str | None
    """The attn_implementation the plan sets (flash_attention_2 or varlen), or None to keep the model's."""
    reasons: dict[str, str]
    """Why a switch is off (or not applicable), by switch name."""

    def line(self) -> str:
        """One log line: "kernels: liger off (no CUDA), chunked loss on (4096 tokens), experts grouped_mm, ..."."""
        def state(name: str, label: str, on: bool, detail: str = "") -> str:
            note = detail if on else self.reasons.get(name, "")
            return f"{label} {'on' if on else 'off'}" + (f" ({note})" if note else "")

        experts = f"experts {self.experts}" if self.experts else "experts n/a (no MoE experts)"
        return "kernels: " + ", ".join([
            state("liger", "liger", self.liger),
            state("chunked_loss", "chunked loss", self.chunked_loss, f"{self.loss_chunk_tokens} tokens"),
            experts,
            state("fused_optimizer", "fused AdamW", self.fused_optimizer),
            state("compile", "compile", self.compile),
            f"checkpointing {self.checkpointing}" + (f" ({self.reasons['checkpointing']})" if "checkpointing" in self.reasons else ""),
            f"attention {self.attention}" if self.attention else f"attention unchanged ({self.reasons['attention']})",
        ])

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_speed_plan(train: TrainConfig, model, cuda: bool | None = None,
                       attn_implementation: str | None = None) -> SpeedPlan:
    """The switches of train resolved for model (after the method is applied: a PeftModel for LoRA) on this machine.

    cuda defaults to torch.cuda.is_available(); attn_implementation is model.attn_implementation (a user's choice
    the plan keeps). Raises DsftError when a switch set to on cannot apply here.
    """
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    reasons: dict[str, str] = {}
    config = _base_model(model).config
    liger = _decide("liger", train.liger, _liger_blocker(cuda, config.model_type), reasons)
    chunked_blocker = _chunked_loss_blocker(model) or _sharded_head_blocker(train.distributed)
    if chunked_blocker is None and train.chunked_loss == "auto" and not cuda:
        chunked_blocker = "no CUDA: the model's own loss"  # the fallback; on still forces it
    chunked = _decide("chunked_loss", train.chunked_loss, chunked_blocker, reasons)
    fused = _decide("fused_optimizer", train.fused_optimizer, None, reasons)
    if not train.compile:
        reasons["compile"] = "train.compile: false"
    checkpointing = train.checkpointing if train.gradient_checkpointing else "off"
    if checkpointing == "offload" and not cuda:
        checkpointing = "full"  # activations already live in host memory (and pinning needs an accelerator)
        reasons["checkpointing"] = "offload needs CUDA: full"
    return SpeedPlan(
        liger=liger, chunked_loss=chunked, loss_chunk_tokens=train.loss_chunk_tokens,
        experts=_resolve_experts(train.experts, model, cuda), fused_optimizer=fused, compile=train.compile,
        checkpointing=checkpointing,
        attention=_resolve_attention(train.packing, attn_implementation, cuda, config.model_type, reasons),
        reasons=reasons,
    )


def _resolve_attention(packing: bool, attn_implementation: str | None, cuda: bool, model_type: str | None,
                       reasons: dict[str, str]):
    attention, reason = packed_attention(packing, attn_implementation, cuda, model_type)
    if reason is not None:
        reasons["attention"] = reason
    return attention


def packed_attention(packing: bool, attn_implementation: str | None, cuda: bool,
                     model_type: str | None = None) -> tuple[str | None, str | None]:
    """(the attn_implementation for packed rows, None) or (None, why the model's own kernel stays); see the module
    docstring. attn_implementation is model.attn_implementation, a user's choice that stays; model_type's family
    may keep the block-diagonal mask (models/families.py)."""
    from dsft.models.varlen_attention import VARLEN, varlen_kernel_available

    if not packing:
        return None, "no packing"
    if attn_implementation is not None:
        return None, f"model.attn_implementation: {attn_implementation}"
    varlen_blocker = family_of(model_type).varlen_blocker
    if varlen_blocker is not None:
        return None, f"{varlen_blocker}: the block-diagonal mask"
    if not cuda:
        return None, "no CUDA: the block-diagonal mask"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2", None
    if varlen_kernel_available():
        return VARLEN, None
    return None, "no varlen kernel in this torch: the block-diagonal mask"


def set_attention(model, attention: str) -> None:
    """Switch model (PEFT-wrapped or not) to attention (flash_attention_2, or dsft's varlen, registered here)."""
    from dsft.models.varlen_attention import VARLEN, register_varlen_attention

    _base_model(model).set_attn_implementation(register_varlen_attention() if attention == VARLEN else attention)


def _decide(name: str, setting: str, blocker: str | None, reasons: dict[str, str]) -> bool:
    """on/off/auto with what prevents the switch (None: nothing); on with a blocker is a user error."""
    if setting == "off":
        reasons[name] = f"train.{name}: off"
        return False
    if blocker is not None:
        if setting == "on":
            raise DsftError(f"train.{name}: on, but {blocker}; set it to auto or off")
        reasons[name] = blocker
        return False
    return True


def _liger_blocker(cuda: bool, model_type: str) -> str | None:
    if not cuda:
        return "no CUDA"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed"
    if model_type not in LIGER_ARCHITECTURES:
        return f"{model_type} not among {', '.join(LIGER_ARCHITECTURES)}"
    return None


def _chunked_loss_blocker(model) -> str | None:
    from dsft.models.chunked_loss import plain_linear_head

    if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
        return "prefix and prompt tuning prepend virtual tokens the labels do not have"
    config = _base_model(model).config.get_text_config()
    if getattr(config, "output_router_logits", False):
        return "the model adds a router auxiliary loss"
    if getattr(config, "final_logit_softcapping", None) is not None:
        return "the model soft-caps its logits"
    if plain_linear_head(_base_model(model).get_output_embeddings()) is None:
        return "LoRA adapts the lm_head"
    return None


def _sharded_head_blocker(engine: str) -> str | None:
    """DeepSpeed ZeRO-3 gathers the lm_head weight only around the head's own forward and backward, and the chunked
    loss forms the head's gradient itself, outside that backward: two ZeRO-3 processes failed with a size mismatch
    against the partitioned weight. DDP, ZeRO-2 and FSDP2 run it (tests/recipes/test_distributed.py)."""
    # WORLD_SIZE as torch.distributed's launcher sets it (what dsft.train.distributed.world_size reads): models/
    # sits below train/ and does not import it.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and engine in ("zero3", "zero3_offload"):
        return f"train.distributed: {engine} partitions the lm_head weight: the model's own loss"
    return None


def _resolve_experts(setting: str, model, cuda: bool) -> str | None:
    if not type(_base_model(model))._can_set_experts_implementation():
        return None
    if setting != "auto":
        return setting
    return "grouped_mm" if _has_grouped_gemm(cuda) else "eager"


def _has_grouped_gemm(cuda: bool) -> bool:
    """Whether torch has a grouped GEMM kernel for the training device (what transformers' grouped_mm calls)."""
    import torch

    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if cuda:
        return torch.cuda.get_device_capability() >= (8, 0)
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 9)


def optimizer_name(fused_optimizer: str) -> str:
    """TrainingArguments.optim for train.fused_optimizer: torch's fused AdamW unless it is off."""
    return "adamw_torch" if fused_optimizer == "off" else "adamw_torch_fused"


def apply_speed_plan(model, plan: SpeedPlan) -> None:
    """Put the plan's model-side switches in place: experts kernel, Liger, checkpointing, then compile (last, so it
    compiles the layers as they will run). The optimizer and the loss are the Trainer's (loop.py, trainer.py)."""
    base = _base_model(model)
    if plan.attention is not None:
        set_attention(model, plan.attention)
    if plan.experts is not None:
        from dsft.models.moe_lora import register_grouped_lora

        base.set_experts_implementation(register_grouped_lora() if plan.experts == "grouped_mm" else plan.experts)
    if plan.liger:
        from transformers.integrations.liger import apply_liger_kernel

        # The chunked loss covers every architecture, so Liger's loss kernels, which replace the forward, stay off.
        apply_liger_kernel(model, {"fused_linear_cross_entropy": False, "cross_entropy": False})
    enable_checkpointing(model, plan.checkpointing)
    if plan.compile:
        from dsft.models.method import decoder_layers

        for layer in decoder_layers(base):
            layer.compile()


def enable_checkpointing(model, mode: str) -> None:
    """Activation checkpointing of every decoder layer in mode off, full, selective or offload (see the module
    docstring), through transformers' activation_checkpointing_enable."""
    if mode == "off":
        return
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _save_attention_outputs
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=mode == "offload")
    model.enable_input_require_grads()  # frozen embeddings (LoRA) must still pass gradients into the layers


def _save_attention_outputs():
    """Selective activation checkpointing contexts: attention kernel outputs are kept, everything else recomputed."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    attention_ops = {getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in attention_ops else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _base_model(model):
    """The transformers model under a PEFT wrapper (or model itself)."""
    return model.get_base_model() if hasattr(model, "peft_config") else model
