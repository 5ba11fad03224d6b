"""Config section method: which weights train. full, freeze, and the PEFT adapters (LoRA and its variants, QLoRA,
prefix and prompt tuning, IA3), each through PEFT's own config (dsft/models/method.py builds them). Combinations
PEFT cannot train are refused here, naming both keys."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsft.config.base import Section
from dsft.config.moe import MoeConfig


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input; must be 0 when LoRA reaches fused MoE expert weights (DeepSeek MoE)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj, gate_proj,
    up_proj, down_proj) or all-linear."""
    modules_to_save: list[str] = []
    """Modules trained in full and saved beside the adapter (e.g. lm_head, embed_tokens)."""
    use_dora: bool = False
    """DoRA: each adapted weight split into a trained magnitude per output row and a LoRA-updated direction."""
    use_rslora: bool = False
    """rsLoRA: scale the update by alpha / sqrt(r), which keeps high ranks learning."""
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    """Adapter initialisation: default (B = 0), gaussian, pissa (A and B from the weight's principal singular
    vectors, the base keeps the rest), olora (from its QR decomposition), loftq (type qlora: A and B fitted to the
    4-bit base's quantization error). pissa and olora adapters are saved converted to plain LoRA on the original
    base (rank 2r), so merge, export and every loader see an ordinary adapter."""
    rank_pattern: dict[str, int] = {}
    """Ranks other than r for the modules whose names match a key (PEFT's rank_pattern: a regex or name suffix)."""
    alpha_pattern: dict[str, float] = {}
    """Alphas other than alpha for the modules whose names match a key (PEFT's alpha_pattern)."""
    plus_lr_ratio: float | None = Field(None, gt=1.0)
    """LoRA+: the B matrices learn at this multiple of train.learning_rate (its paper: 16); none: the same rate."""


class QloraConfig(Section):
    bits: Literal[4, 8] = 4
    """Bits per frozen base weight: 4 (QLoRA, bitsandbytes' 4-bit) or 8 (LLM.int8)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (normal float, QLoRA's, for normally distributed weights) or fp4."""
    double_quant: bool = True
    """Quantize the per-block scales as well (QLoRA's double quantization, about 0.37 bits per weight saved)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype the quantized layers dequantize to and compute in; auto: model.dtype as resolved."""
    skip_modules: list[str] = []
    """Module names kept unquantized (besides the output head, always kept), e.g. a layer sensitive to rounding."""


class PrefixConfig(Section):
    kind: Literal["prefix", "prompt"] = "prefix"
    """prefix: trained key/value vectors prepended in every attention layer (prefix tuning); prompt: trained input
    embeddings prepended to the sequence (prompt tuning)."""
    num_virtual_tokens: int = Field(20, ge=1)
    """Trained positions prepended."""
    projection: bool = False
    """Prefix tuning: reparametrize the prefix through a two-layer MLP while training (its paper's stabilizer)."""


class Ia3Config(Section):
    target_modules: list[str] = ["k_proj", "v_proj", "down_proj"]
    """Modules whose activations IA3 rescales by a trained vector (DeepSeek MLA: kv_b_proj, o_proj, down_proj)."""
    feedforward_modules: list[str] = ["down_proj"]
    """The subset of target_modules that are feed-forward layers (their input is rescaled, not their output)."""


class FreezeConfig(Section):
    trainable_layers: int = Field(2, ge=0)
    """Number of top decoder layers to train; the rest stay frozen."""
    train_embeddings: bool = False
    """Also train the input embeddings."""


class UnfreezeStep(Section):
    step: int = Field(ge=0)
    """Optimizer step from which these layers train (0: from the start)."""
    layers: int | Literal["all"]
    """Top decoder layers that train from this step on, counted from the top; all: every layer and the embeddings."""


ADAPTER_METHODS = ("lora", "qlora", "prefix", "ia3")
"""method.type values that train a PEFT adapter on a frozen base and save only the adapter."""
SECTION_TYPES = {"lora": ("lora", "qlora"), "qlora": ("qlora",), "prefix": ("prefix",), "ia3": ("ia3",),
                 "freeze": ("freeze",)}
"""The method.type values each method section applies to (dump_config writes only those)."""


class MethodConfig(Section):
    type: Literal["full", "lora", "qlora", "prefix", "ia3", "freeze"] = "lora"
    """full: every weight; lora: PEFT LoRA adapter (DoRA, rsLoRA, PiSSA, ... in method.lora); qlora: a LoRA adapter
    on a base frozen in 4 or 8 bits (bitsandbytes); prefix: prefix or prompt tuning; ia3: IA3's rescaling vectors;
    freeze: only the top layers and the head."""
    lora: LoraConfig = LoraConfig()
    """Settings for types lora and qlora."""
    qlora: QloraConfig = QloraConfig()
    """How type qlora quantizes the frozen base."""
    prefix: PrefixConfig = PrefixConfig()
    """Settings for type prefix."""
    ia3: Ia3Config = Ia3Config()
    """Settings for type ia3."""
    freeze: FreezeConfig = FreezeConfig()
    """Settings for type freeze."""
    moe: MoeConfig = MoeConfig()
    """Mixture-of-experts models: router policy, load balancing, which experts LoRA adapts, load telemetry."""
    unfreeze: list[UnfreezeStep] = []
    """Progressive unfreezing (types full and lora): the head (and final norm) trains from the start, each entry
    adds top decoder layers from its step on, e.g. [{step: 0, layers: 0}, {step: 100, layers: 4}, {step: 300, layers: all}]."""

    @property
    def adapter(self) -> bool:
        """Whether the method trains a PEFT adapter on a frozen base and saves only the adapter."""
        return self.type in ADAPTER_METHODS

    @property
    def lora_family(self) -> bool:
        """Whether the adapter is LoRA (types lora and qlora): mergeable into the base weights."""
        return self.type in SECTION_TYPES["lora"]

    @model_validator(mode="after")
    def _settings_match_type(self) -> MethodConfig:
        for section, types in SECTION_TYPES.items():
            if section in self.model_fields_set and self.type not in types:
                raise ValueError(f"method.{section} is set but method.type is {self.type!r}")
        if self.unfreeze and self.type not in ("full", "lora"):
            reason = " (its base weights are quantized: they cannot train)" if self.type == "qlora" else ""
            raise ValueError(f"method.unfreeze works with method.type full or lora; type {self.type} keeps a fixed "
                             f"set{reason}")
        steps = [entry.step for entry in self.unfreeze]
        layers = [float("inf") if entry.layers == "all" else entry.layers for entry in self.unfreeze]
        if steps != sorted(set(steps)) or layers != sorted(layers):
            raise ValueError("method.unfreeze entries must have increasing steps and non-decreasing layers")
        self._check_lora_combinations()
        self._check_moe()
        return self

    def _check_moe(self) -> None:
        moe = self.moe
        lora_only = ("experts", "top_experts", "shared_rank", "routed_rank")
        for key in lora_only if not self.lora_family else ():
            if key in moe.changed():
                raise ValueError(f"method.moe.{key} chooses what LoRA adapts: it needs method.type lora or qlora")
        if "router_adapter" in moe.changed() and not self.adapter:
            raise ValueError(f"method.moe.router_adapter applies to the adapter methods; method.type {self.type} "
                             "trains the gate itself when method.moe.router is train")
        if moe.router == "freeze" and self.unfreeze:
            raise ValueError("method.moe.router freeze with method.unfreeze: unfreezing a layer trains its router; "
                             "leave method.moe.router auto or train")
        if moe.router_adapter == "lora" and not self.lora_family:
            raise ValueError("method.moe.router_adapter lora needs method.type lora or qlora")

    def _check_lora_combinations(self) -> None:
        lora, init = self.lora, self.lora.init
        if init == "loftq" and (self.type != "qlora" or self.qlora.bits != 4):
            raise ValueError("method.lora.init loftq fits the adapter to a 4-bit base's quantization error: it needs "
                             "method.type qlora with method.qlora.bits 4")
        if init in ("pissa", "olora") and self.type == "qlora":
            raise ValueError(f"method.lora.init {init} rewrites the base weights, which method.type qlora holds "
                             "quantized: use init loftq (or default) with qlora, or method.type lora")
        if lora.use_dora and init in ("pissa", "olora", "loftq"):
            raise ValueError(f"method.lora.use_dora and method.lora.init {init}: DoRA's magnitudes are taken from the "
                             "base weights, which that initialisation changes or fits; use one of them")
        prefix = self.prefix
        if prefix.kind == "prompt" and prefix.projection:
            raise ValueError("method.prefix.projection applies to method.prefix.kind prefix (prefix tuning)")
        if not set(self.ia3.feedforward_modules) <= set(self.ia3.target_modules):
            raise ValueError("method.ia3.feedforward_modules must be a subset of method.ia3.target_modules")
