"""method.type qlora's pieces: the config refuses what cannot work, the merge's rebuilt weight is the one the 4-bit
layer computes with, and the parameter counts count 4-bit weights by value, not by byte."""

import pytest
import torch
from pydantic import ValidationError

from dsft.config import MethodConfig, RunConfig
from dsft.models.method import count_parameters
from dsft.models.quantize import quantization_kwargs, round_trip

bnb = pytest.importorskip("bitsandbytes")


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValidationError, match="method.qlora is set but method.type is 'lora'"):
        MethodConfig(type="lora", qlora={"bits": 4})
    with pytest.raises(ValidationError, match="its base weights are quantized"):
        MethodConfig(type="qlora", unfreeze=[{"step": 0, "layers": 1}])
    with pytest.raises(ValidationError, match="task multitask does not train on a quantized base"):
        RunConfig(model={"preset": "tiny-qwen2"}, task="multitask", method={"type": "qlora"},
                  multitask={"heads": [{"name": "intent", "kind": "sequence", "label_field": "intent"}]}, data={"train_files": ["t.jsonl"]})
    assert MethodConfig(type="qlora", lora={"r": 4}).adapter and not MethodConfig(type="full").adapter


def test_the_bitsandbytes_config_says_what_the_section_says():
    method = MethodConfig(type="qlora", qlora={"quant_type": "fp4", "double_quant": False, "skip_modules": ["o_proj"]})
    config = quantization_kwargs(method, torch.float32, "classification")["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4" and not config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32 and config.llm_int8_skip_modules == ["o_proj", "score"]
    assert quantization_kwargs(MethodConfig(type="lora"), torch.float32) == {}


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_the_rebuilt_weight_is_the_one_the_4bit_layer_computes_with(quant_type, double_quant):
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    layer = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant)
    layer = layer.to("cpu")  # quantizes, as from_pretrained does
    layer.support_avx512bf16_for_cpu = False
    rebuilt = round_trip(weight, {"bits": 4, "quant_type": quant_type, "double_quant": double_quant},
                         layer.weight.blocksize)
    inputs = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(inputs), inputs @ rebuilt.T, rtol=1e-5, atol=1e-5)
    assert (rebuilt - weight).abs().max() > 1e-3  # the grid is coarse: a plain merge would miss it
    assert count_parameters(layer).total == 96 * 64  # stored as 96 * 64 / 2 bytes
