"""Config section method.moe: what fine-tuning does to a mixture-of-experts model's routing, how its load balance is
kept, which experts an adapter reaches, and the telemetry and guard that show the load (dsft/models/moe.py,
dsft/train/moe.py). It applies to models with routed experts (DeepSeek V2, V3, V3.2, V4 and transformers' other MoE
families) and is ignored by dense models, unless a setting is changed from its default (then refused by name)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsft.config.base import Section


class AuxLossConfig(Section):
    expert: float = Field(0.0, ge=0.0)
    """DeepSeek-V2's expert-level balance loss coefficient (alpha_1: sum over experts of f_i * P_i, f_i the
    expert's share of routed pairs times experts / top-k, P_i its mean routing probability); V2 used 0.003."""
    device: float = Field(0.0, ge=0.0)
    """DeepSeek-V2's device-level balance loss coefficient (alpha_2) over aux_loss.devices groups of experts; V2
    used 0.05."""
    communication: float = Field(0.0, ge=0.0)
    """DeepSeek-V2's communication balance loss coefficient (alpha_3): the share of tokens sent to each device
    group, times its routing probability; V2 used 0.02."""
    sequence: float = Field(0.0, ge=0.0)
    """DeepSeek-V3's complementary sequence-wise balance loss coefficient (alpha: the expert-level loss computed
    within each sequence, on normalised scores, averaged over sequences); V3 used 0.0001."""
    devices: int = Field(1, ge=1)
    """Device groups the routed experts are split into, in order, for the device and communication losses (the
    expert-parallel degree you will serve with; it must divide the number of routed experts)."""

    @property
    def enabled(self) -> bool:
        """Whether any auxiliary loss is on."""
        return any((self.expert, self.device, self.communication, self.sequence))


class MoeConfig(Section):
    router: Literal["auto", "freeze", "train"] = "auto"
    """The routers' gate weights: freeze (bit-identical after training) or train. auto: train for method.type full
    and freeze (its top layers' routers), freeze for the adapter methods, so unloading an adapter gives back the
    base model's routing exactly and a small domain set cannot tilt the router of every layer."""
    router_adapter: Literal["full", "lora"] = "full"
    """With an adapter method and router train: full (each gate trained whole and saved beside the adapter through
    PEFT's modules_to_save; a gate is experts x hidden, small next to the experts) or lora (a LoRA pair on each gate
    weight, PEFT's target_parameters)."""
    bias_update: Literal["auto", "off", "on"] = "auto"
    """DeepSeek-V3's auxiliary-loss-free balancing: after each optimizer step every router's e_score_correction_bias
    moves by bias_update_speed * sign(mean load - expert load), loads counted over the step's real tokens on all
    ranks. auto: on for models with the bias under method.type full with the router training (as V3 was trained),
    off otherwise. With an adapter the gates are saved beside it (modules_to_save), which carries the bias."""
    bias_update_speed: float = Field(0.001, gt=0.0)
    """gamma, the bias change per step (DeepSeek-V3 pre-trained with 0.001)."""
    aux_loss: AuxLossConfig = AuxLossConfig()
    """Auxiliary balance losses added to the training loss (0 by default: off)."""
    experts: Literal["all", "shared", "routed", "top", "none"] = "all"
    """Which experts LoRA all-linear adapts (attention and dense layers as always): all, shared only, routed only,
    top (the top_experts routed experts per layer by load measured on the training data before training, with
    the shared ones), or none."""
    top_experts: int | None = Field(None, ge=1)
    """experts top: routed experts adapted per MoE layer, the most loaded ones in the pass before training."""
    shared_rank: int | None = Field(None, ge=1)
    """LoRA rank of the shared experts (and dense MLP layers); none: method.lora.r."""
    routed_rank: int | None = Field(None, ge=1)
    """LoRA rank of the routed experts (per projection: gate and up get it each in the fused gate_up); none:
    method.lora.r."""
    telemetry: bool = True
    """Count each expert's share of routed tokens: per logging window in metrics.jsonl and TensorBoard, and
    expert_load.json / expert_load.png at the end (before vs after training)."""
    profile_samples: int = Field(64, ge=1)
    """Training samples routed without gradient before and after training, for expert_load's before/after
    comparison and experts: top."""
    collapse_imbalance: float = Field(4.0, gt=1.0)
    """A logging window whose most loaded expert (in any layer) takes more than this multiple of the mean share is
    a collapsed window (its ceiling is experts / top-k, when every token picks the same ones: 32 for V3)."""
    collapse_windows: int = Field(3, ge=1)
    """Collapsed logging windows in a row before on_collapse acts."""
    on_collapse: Literal["warn", "stop"] = "warn"
    """warn: print a warning; stop: save a checkpoint and stop training (resume after changing the routing)."""

    @model_validator(mode="after")
    def _consistent(self) -> MoeConfig:
        if (self.experts == "top") != (self.top_experts is not None):
            raise ValueError("method.moe.top_experts goes with method.moe.experts top (set both, or neither)")
        if self.router_adapter == "lora" and self.bias_update == "on":
            raise ValueError("method.moe.router_adapter lora with method.moe.bias_update on: the correction bias is "
                             "saved with the whole gate (router_adapter full); choose one")
        return self

    def changed(self) -> set[str]:
        """The keys whose value differs from the default (a saved config sets every key, so what the user changed
        is told by value, not by which keys were written)."""
        default = MoeConfig()
        return {key for key in type(self).model_fields if getattr(self, key) != getattr(default, key)}

    def router_for(self, method_type: str) -> str:
        """The router policy in force for method_type: freeze or train (auto resolved as documented above)."""
        if self.router != "auto":
            return self.router
        return "train" if method_type in ("full", "freeze") else "freeze"

    def bias_updates_for(self, method_type: str) -> bool:
        """Whether bias updates run for method_type on a model that has the correction bias."""
        if self.bias_update != "auto":
            return self.bias_update == "on"
        return method_type == "full" and self.router_for(method_type) == "train"
