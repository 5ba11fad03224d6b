"""QLoRA's frozen base (method.type qlora): bitsandbytes 4-bit (NF4 or FP4, double quantization) or 8-bit weights,
loaded through transformers' BitsAndBytesConfig as every peer loads them, under a LoRA adapter in 16/32 bits.

What is quantized: every nn.Linear of the model except the output head (transformers keeps it) and
method.qlora.skip_modules. What is not: embeddings and norms, and modules that are not nn.Linear. In transformers 5
that includes the routed experts of DeepSeek-V2/V3/V4 (and other MoE models), stored as fused 3D parameters
(experts.gate_up_proj, experts.down_proj) that bitsandbytes cannot quantize, and V4's grouped o_a_proj: they stay in
the compute dtype, and the run says how many parameters that leaves (quantization_report). The CPU path is
bitsandbytes' own CPU backend (NF4 and FP4 forward and backward, pure torch where no fused kernel exists), so the
tests train a real 4-bit base; on CUDA its kernels. 8-bit bases need CUDA (see quantization_kwargs). The base is loaded straight onto the device that trains it
(device_map), as bitsandbytes quantizes weights where they are placed.
"""

from __future__ import annotations

import os

from dsft.config import MethodConfig
from dsft.errors import DsftError


def require_bitsandbytes() -> None:
    """Raise DsftError saying how to install bitsandbytes when it is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DsftError('method.type qlora needs bitsandbytes: pip install "dsft[qlora]" (or bitsandbytes)') from None


def quantization_kwargs(method: MethodConfig, dtype, task: str = "causal_lm") -> dict:
    """from_pretrained arguments that load the frozen base as method.qlora says ({} for other methods): its
    BitsAndBytesConfig and a device_map placing it on this process's device. A classifier task's head ("score")
    stays unquantized besides method.qlora.skip_modules: it trains in full."""
    if method.type != "qlora":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    q = method.qlora
    skip = [*q.skip_modules, *(() if task == "causal_lm" else ("score",))] or None
    if q.bits == 8 and not torch.cuda.is_available():
        raise DsftError("method.qlora.bits: 8 needs CUDA. On the CPU bitsandbytes trains 8-bit layers through "
                        "dequantized weights but evaluates them with LLM.int8's quantized activations, which fails on "
                        "DeepSeek's attention inputs and differs from training; use bits 4 (nf4 or fp4) on the CPU")
    if q.bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        compute = dtype if q.compute_dtype == "auto" else getattr(torch, q.compute_dtype)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                    bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute,
                                    llm_int8_skip_modules=skip)
    return {"quantization_config": config, "device_map": {"": _device()}}


def _device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # each process quantizes its own copy on its own GPU


def prepare_for_training(model):
    """The quantized base made ready for an adapter: every weight frozen, and the 1-D ones (norms, biases) upcast
    to float32, whose rounding in 16 bits hurts most.

    PEFT's prepare_model_for_kbit_training upcasts every unquantized 16-bit weight instead: the embeddings and the
    output head (2 x 0.55 B parameters on R1-Distill-Qwen-7B: 4 GiB more than the whole 4-bit base of its linear
    layers) and the routed experts DeepSeek keeps unquantized; those stay in the compute dtype here. Activation
    checkpointing is dsft's train.checkpointing, not PEFT's."""
    import torch

    for parameter in one_cpu_path(model).parameters():
        parameter.requires_grad_(False)
        if parameter.ndim == 1 and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    return model


def one_cpu_path(model):
    """model with every 4-bit layer on bitsandbytes' plain dequantizing CPU path.

    On CPUs with AVX512-BF16 its CPU backend repacks a 4-bit weight in place for a faster eval-mode kernel, and only
    where out_features is a multiple of 32 (it fails elsewhere); the plain path runs on every CPU and computes the
    same on each, so each layer keeps that one (an attribute of the layer instance, nothing global)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def is_quantized_weight(parameter) -> bool:
    """Whether a parameter is a bitsandbytes 4-bit or 8-bit weight."""
    return type(parameter).__name__ in ("Params4bit", "Int8Params")


def logical_numel(parameter) -> int:
    """The number of weights a parameter holds (a 4-bit one packs two per stored byte)."""
    state = getattr(parameter, "quant_state", None)
    if type(parameter).__name__ == "Params4bit" and state is not None:
        return int(state.shape.numel())
    return parameter.numel()


def quantization_report(model) -> dict:
    """What the base holds: parameters quantized and not (weights of at least 2 dimensions, by module kind), and
    the model's memory footprint in bytes."""
    quantized, kept = 0, {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.requires_grad:
                continue  # the adapter's (and trained heads'), not the base's
            if is_quantized_weight(parameter):
                quantized += module.in_features * module.out_features  # 4-bit packs two values per byte
            elif parameter.ndim >= 2:
                kind = f"{type(module).__name__}.{name}"
                kept[kind] = kept.get(kind, 0) + parameter.numel()
    total = quantized + sum(kept.values())
    return {"quantized_parameters": quantized, "unquantized_parameters": dict(sorted(kept.items())),
            "quantized_share": round(quantized / total, 4) if total else 0.0,
            "memory_footprint_bytes": int(model.get_memory_footprint())}


def report_line(report: dict) -> str:
    kept = ", ".join(f"{kind} {count:,}" for kind, count in report["unquantized_parameters"].items())
    return (f"qlora: {report['quantized_parameters']:,} base weights quantized ({report['quantized_share']:.1%} of "
            f"the matrices); left in the compute dtype: {kept or 'none'}; footprint "
            f"{report['memory_footprint_bytes'] / 2**20:,.1f} MiB")


QUANTIZATION_FILE = "quantization.json"
"""In a qlora run directory: which base weights were quantized, and how (what a merge needs to rebuild them)."""


def quantized_weights(model) -> dict:
    """{state-dict key of each quantized weight: its 4-bit block size, or 0 for 8-bit} of a loaded base."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and is_quantized_weight(weight):
            four_bit = type(weight).__name__ == "Params4bit"
            found[f"{name}.weight"] = int(weight.blocksize) if four_bit else 0
    return found


def round_trip(weight, qlora: dict, blocksize: int):
    """weight as the quantized base computed with it: quantized as bitsandbytes quantized it at load, then
    dequantized (4-bit: in blocks of blocksize, nf4 or fp4, double quantization as trained; 8-bit: row-wise
    absmax of the float16 weight). qlora: the run's method.qlora settings; returns float32."""
    import bitsandbytes.functional as bnb_functional
    import torch

    if qlora["bits"] == 8:
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        return bnb_functional.int8_vectorwise_dequant(codes, scales).float()
    packed, state = bnb_functional.quantize_4bit(weight.contiguous(), blocksize=blocksize,
                                                 compress_statistics=qlora["double_quant"], quant_type=qlora["quant_type"])
    return bnb_functional.dequantize_4bit(packed, state).float()


def quantized_bytes_per_weight(qlora) -> float:
    """Bytes a quantized base weight holds: 4-bit codes plus one scale per block of 64 (float32, or 8-bit with
    double quantization, whose own float32 scales per 256 blocks are negligible); 8-bit: a byte plus a float32 scale
    per row, not counted here (one per row of thousands)."""
    if qlora.bits == 8:
        return 1.0
    scale_bits = 8 + 32 / 256 if qlora.double_quant else 32
    return (4 + scale_bits / 64) / 8


def frozen_weight_bytes(model, method: MethodConfig, dtype_bytes: int) -> int:
    """Bytes of the frozen parameters of model (built with the method applied, possibly on the meta device) as the
    run will hold them: for qlora the nn.Linear weights bitsandbytes quantizes at quantized_bytes_per_weight, the
    1-D ones in float32 (prepare_for_training upcasts them), the rest dtype_bytes each; else dtype_bytes each."""
    import torch

    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    if method.type != "qlora":
        return dtype_bytes * sum(p.numel() for _, p in frozen)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantizable = {id(module.weight) for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head
                   and not any(skip in name.split(".") for skip in method.qlora.skip_modules)
                   and "lora_" not in name and "modules_to_save" not in name}
    per_weight = quantized_bytes_per_weight(method.qlora)
    return int(sum(p.numel() * (per_weight if id(p) in quantizable else 4 if p.ndim == 1 else dtype_bytes)
                   for _, p in frozen))
