"""Config sections of the preference and RL stages: reward (a reward model), dpo, grpo and ppo, with the reward
functions and sampling settings the RL stages share."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsft.config.base import Section


class RewardModelConfig(Section):
    center_rewards_coefficient: float | None = Field(None, gt=0)
    """Coefficient of a penalty on the squared mean reward, keeping rewards centred on 0 (TRL); none: off."""


SIMPO_GAMMA = 0.5
"""dpo.simpo_gamma's default, TRL's CPOConfig's."""


class DpoConfig(Section):
    beta: float = Field(0.1, gt=0)
    """Strength of the pull toward the reference model: higher stays closer to it."""
    loss: Literal["sigmoid", "ipo", "robust", "hinge", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "simpo", "orpo"] = "sigmoid"
    """The DPO-family loss TRL computes: sigmoid (DPO); ipo (IPO's squared loss, per-token log-ratios: no
    overfitting to deterministic preferences); robust (DPO robust to label_smoothing's share of flipped labels);
    hinge (SLiC's hinge on the margin); sigmoid_norm (DPO on per-token log-ratios, as SimPO normalizes by
    length, with the reference kept); exo_pair (EXO, label_smoothing > 0); nca_pair (NCA); bco_pair (BCO);
    sppo_hard (SPPO with hard labels); aot and aot_unpaired (alignment by optimal transport); apo_zero and
    apo_down (anchored preference optimization: chosen better, or worse, than the model's own answers);
    discopop (DiscoPOP, discopop_tau 0.05); without a reference model, on each answer's mean token log-probability:
    simpo (SimPO: beta x the margin of the means against simpo_gamma; its paper uses beta 2 to 2.5) and orpo
    (ORPO: the chosen answer's NLL plus beta x the log odds ratio loss; beta is its lambda, 0.1)."""
    simpo_gamma: float = Field(SIMPO_GAMMA, ge=0.0)
    """SimPO's target reward margin gamma (loss simpo only): the chosen answer's scaled mean log-probability
    should beat the rejected one's by this much."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Assumed share of preference pairs whose labels are flipped (losses robust, exo_pair, aot, aot_unpaired)."""
    reference: str | None = None
    """Reference model (local dir or hub id); default: the starting model (with LoRA, the model with its
    adapter disabled, so no second copy of the weights)."""

    @model_validator(mode="after")
    def _smoothing_where_it_applies(self) -> DpoConfig:
        smoothed = ("robust", "exo_pair", "aot", "aot_unpaired", "simpo")
        if self.label_smoothing and self.loss not in smoothed:
            raise ValueError(f"dpo.label_smoothing applies to losses {', '.join(smoothed)} only (loss is {self.loss!r})")
        if self.loss == "exo_pair" and not self.label_smoothing:
            raise ValueError("dpo.loss exo_pair needs dpo.label_smoothing > 0 (its target distribution; 1e-3 is usual)")
        if self.simpo_gamma != SIMPO_GAMMA and self.loss != "simpo":  # not fields_set: a saved config writes it
            raise ValueError(f"dpo.simpo_gamma applies to loss simpo only (loss is {self.loss!r})")
        if self.reference is not None and self.loss in ("simpo", "orpo"):
            raise ValueError(f"dpo.loss {self.loss} uses no reference model; remove dpo.reference")
        return self


class KtoConfig(Section):
    beta: float = Field(0.1, gt=0)
    """Strength of the pull toward the reference model: higher stays closer to it."""
    loss: Literal["kto", "apo_zero_unpaired"] = "kto"
    """kto: KTO's prospect-theoretic loss, each answer's log-ratio to the reference against the KL estimate from
    mismatched answers; apo_zero_unpaired: APO-zero without pairs (desirable answers up, undesirable down)."""
    desirable_weight: float = Field(1.0, gt=0)
    """Weight of the desirable (label true) answers' losses; with unequal counts, KTO's paper advises that
    desirable_weight x desirable / (undesirable_weight x undesirable) lie in [1, 4/3]."""
    undesirable_weight: float = Field(1.0, gt=0)
    """Weight of the undesirable (label false) answers' losses."""
    reference: str | None = None
    """Reference model (local dir or hub id); default: the starting model (with LoRA, the model with its
    adapter disabled)."""


class RewardFunctionConfig(Section):
    kind: Literal["accuracy", "regex", "format", "diversity", "efficiency", "reward_model", "python"]
    """accuracy: 1 when the final answer equals the reference; regex: 1 when pattern matches; format: 1 for a
    thinking block followed by an answer; diversity: share of the completion's word bigrams (start and end
    marked, so a one-word answer has two) not in the other completions of its group; efficiency: 1 - tokens /
    max_new_tokens; reward_model: a dsft reward run's score; python: a function f(completion, reference,
    prompt) -> float."""
    weight: float = Field(1.0, ge=0)
    """Weight of this component in the summed reward (e.g. 0.6 accuracy + 0.3 diversity + 0.1 efficiency)."""
    name: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    """Name in the logs (reward_<name>); default: the kind."""
    pattern: str | None = None
    """Regular expression of kind regex (Python re.search)."""
    model: str | None = None
    """Run directory of a dsft reward model (stage reward), for kind reward_model."""
    function: str | None = None
    """"module:function" or "path/file.py:function" for kind python."""

    @model_validator(mode="after")
    def _settings_match_kind(self) -> RewardFunctionConfig:
        needed = {"regex": "pattern", "reward_model": "model", "python": "function"}
        for kind, key in needed.items():
            if (self.kind == kind) != (getattr(self, key) is not None):
                raise ValueError(f"a reward of kind {kind} needs {key}, and {key} belongs to kind {kind} only")
        return self


class SamplingConfig(Section):
    max_new_tokens: int = Field(64, ge=1)
    """Longest sampled completion in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of completions."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""


class GrpoConfig(Section):
    group_size: int = Field(4, ge=2)
    """Completions sampled per prompt; advantages are the rewards normalized within each group. train.batch_size
    counts completions, and train.batch_size x train.grad_accum_steps must be a multiple of group_size."""
    sampling: SamplingConfig = SamplingConfig()
    """How completions are sampled."""
    kl_coef: float = Field(0.04, ge=0)
    """Weight of the KL penalty to the reference model (beta); 0 needs no reference."""
    clip_epsilon: float = Field(0.2, gt=0)
    """Clipping range of the policy ratio."""
    iterations: int = Field(1, ge=1)
    """Policy updates per batch of sampled completions."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the standard deviation of the group's rewards, of the batch's, or not at all."""
    rewards: list[RewardFunctionConfig] = Field(default_factory=lambda: [RewardFunctionConfig(kind="accuracy")])
    """Reward components, summed with their weights; each is logged separately."""


class PpoConfig(Section):
    sampling: SamplingConfig = SamplingConfig()
    """How rollouts are sampled."""
    rollout_batch_size: int = Field(16, ge=2)
    """Prompts per PPO step, one completion each; updated on in minibatches of train.batch_size x
    train.grad_accum_steps completions (the batch is one group for the diversity reward)."""
    rewards: list[RewardFunctionConfig] = Field(default_factory=lambda: [RewardFunctionConfig(kind="accuracy")])
    """Reward components of a whole completion (given at its last token), summed with their weights."""
    gamma: float = Field(0.99, ge=0, le=1)
    """Discount of future rewards per token."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda: bias-variance trade-off of the advantage estimate."""
    kl_coef: float = Field(0.2, ge=0)
    """Per-token KL penalty to the reference model, subtracted from the reward."""
    entropy_coef: float = Field(0.01, ge=0)
    """Entropy bonus weight in the policy loss."""
    clip_range: float = Field(0.2, gt=0)
    """Clipping range of the policy ratio."""
    value_clip_range: float = Field(0.2, gt=0)
    """Clipping range of the value prediction around its rollout value."""
    value_loss_coef: float = Field(0.5, ge=0)
    """Weight of the value loss."""
    ppo_epochs: int = Field(4, ge=1)
    """Optimization passes over each batch of rollouts."""
    whiten_advantages: bool = True
    """Normalize advantages to mean 0 and standard deviation 1 per batch."""
