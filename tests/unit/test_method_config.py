"""method: combinations PEFT cannot train are config errors naming both keys; each adapter type gets the PEFT
config its section describes."""

import pytest
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from pydantic import ValidationError

from dsft.config import MethodConfig
from dsft.models.method import peft_config


@pytest.mark.parametrize("method, message", [
    ({"type": "lora", "lora": {"init": "loftq"}}, "method.lora.init loftq .* needs method.type qlora"),
    ({"type": "qlora", "lora": {"init": "loftq"}, "qlora": {"bits": 8}}, "with method.qlora.bits 4"),
    ({"type": "qlora", "lora": {"init": "pissa"}}, "method.lora.init pissa rewrites the base weights, which "
                                                   "method.type qlora holds quantized"),
    ({"type": "lora", "lora": {"use_dora": True, "init": "olora"}}, "method.lora.use_dora and method.lora.init olora"),
    ({"type": "prefix", "prefix": {"kind": "prompt", "projection": True}}, "method.prefix.projection applies to"),
    ({"type": "ia3", "ia3": {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}},
     "feedforward_modules must be a subset of method.ia3.target_modules"),
    ({"type": "prefix", "lora": {"r": 4}}, "method.lora is set but method.type is 'prefix'"),
    ({"type": "ia3", "unfreeze": [{"step": 0, "layers": 1}]}, "method.unfreeze works with method.type full or lora"),
    ({"type": "lora", "lora": {"plus_lr_ratio": 1.0}}, "plus_lr_ratio"),
])
def test_combinations_peft_cannot_train_are_refused(method, message):
    with pytest.raises(ValidationError, match=message):
        MethodConfig.model_validate(method)


def test_each_type_builds_its_peft_config():
    lora = peft_config(MethodConfig.model_validate({"type": "lora", "lora": {
        "r": 4, "alpha": 8, "use_dora": True, "use_rslora": True, "init": "gaussian", "rank_pattern": {"o_proj": 2},
        "alpha_pattern": {"o_proj": 4.0}}}))
    assert isinstance(lora, LoraConfig) and (lora.r, lora.lora_alpha, lora.use_dora, lora.use_rslora) == (4, 8, True, True)
    assert lora.init_lora_weights == "gaussian" and lora.rank_pattern == {"o_proj": 2} and lora.alpha_pattern == {"o_proj": 4.0}
    prefix = peft_config(MethodConfig.model_validate({"type": "prefix", "prefix": {"num_virtual_tokens": 5,
                                                                                    "projection": True}}))
    assert isinstance(prefix, PrefixTuningConfig) and prefix.num_virtual_tokens == 5 and prefix.prefix_projection
    prompt = peft_config(MethodConfig.model_validate({"type": "prefix", "prefix": {"kind": "prompt"}}))
    assert isinstance(prompt, PromptTuningConfig) and prompt.num_virtual_tokens == 20
    ia3 = peft_config(MethodConfig.model_validate({"type": "ia3"}), "SEQ_CLS")
    assert isinstance(ia3, IA3Config) and set(ia3.feedforward_modules) == {"down_proj"} and ia3.modules_to_save == ["score"]
