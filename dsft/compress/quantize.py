"""Quantization methods of `dsft compress`, through torchao and transformers' TorchAoConfig: the model is loaded
quantized (every linear layer but lm_head; embeddings stay in their dtype) and saved as safetensors with its
quantization config, so `AutoModelForCausalLM.from_pretrained` loads it back quantized (torchao installed).

int8-dynamic: int8 weights (per channel) and int8 activations quantized per token at run time, the CPU serving
choice; int8-weight: int8 weights (per channel), activations in their dtype; int4-weight: int4 weights in groups of
group_size (torchao's IntxWeightOnlyConfig, which runs on CPU and GPU; the int4 values are stored one per byte, so
the file is about half the float32 size of those layers, not a quarter: the report gives the measured size).
"""

from __future__ import annotations

from pathlib import Path

from dsft.config.compress import CompressConfig
from dsft.errors import DsftError

QUANTIZE_METHODS = ("int8-dynamic", "int8-weight", "int4-weight")


def torchao_config(settings: CompressConfig):
    """transformers' TorchAoConfig for the method; raises DsftError when torchao is not installed."""
    try:
        import torch
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerGroup
        from transformers import TorchAoConfig
    except ImportError:
        raise DsftError(f"--method {settings.method} needs torchao: pip install 'dsft[compress]'") from None
    quant_type = {"int8-dynamic": Int8DynamicActivationInt8WeightConfig,
                  "int8-weight": Int8WeightOnlyConfig,
                  "int4-weight": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                              granularity=PerGroup(settings.group_size))}[settings.method]()
    return TorchAoConfig(quant_type=quant_type, modules_to_not_convert=["lm_head"])


def load_quantized(source: Path, settings: CompressConfig):
    """The model of source loaded quantized by settings.method; raises DsftError naming the layer width a group
    size does not divide."""
    import torch
    from transformers import AutoModelForCausalLM

    if settings.method == "int4-weight":
        _check_group_size(source, settings.group_size)
    return AutoModelForCausalLM.from_pretrained(source, quantization_config=torchao_config(settings),
                                                dtype=torch.float32, use_safetensors=True).eval()


def _check_group_size(source: Path, group_size: int) -> None:
    import json

    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    widths = {config.get("hidden_size"), config.get("intermediate_size")} - {None}
    bad = sorted(width for width in widths if width % group_size)
    if bad:
        raise DsftError(f"compress.group_size {group_size} does not divide the layer width {bad[0]}; pick a divisor "
                        f"of {', '.join(map(str, sorted(widths)))}")
