"""SimPO and ORPO (dpo.loss simpo | orpo): preference losses that need no reference model.

Both score an answer by the mean log-probability of its tokens under the policy alone (length-normalized, so a
long answer is not favoured for its length):
- SimPO (Meng et al. 2024): -log sigmoid(beta (mean_chosen - mean_rejected) - gamma), gamma (dpo.simpo_gamma) a
  target margin; with dpo.label_smoothing e, (1 - e) of that plus e x -log sigmoid(-(...)). This is TRL's CPOTrainer
  with loss_type simpo and cpo_alpha 0.
- ORPO (Hong et al. 2024): the chosen answer's negative log-likelihood (per token) minus beta x log sigmoid(log odds
  ratio), log odds = (mean_chosen - mean_rejected) - (log(1 - p_chosen) - log(1 - p_rejected)), p = exp(mean). TRL's
  ORPOTrainer; one choice differs: TRL's NLL covers the prompt's tokens too, dsft's the answer's only, as the
  paper's SFT term and every dsft stage train answers, not prompts.

TRL's CPO and ORPO trainers (trl.experimental) tokenize text themselves; dsft's rows arrive rendered and tokenized
(preference_data.py), so the stage keeps dsft's rows, TRL's preference collator and TRL's fused LM head
(add_fused_lm_head: per-token log-probabilities without the [tokens, vocab] logits) and computes the loss here;
tests/unit/test_reference_free.py checks it against TRL's own cpo_loss and odds_ratio_loss on a fixed batch.
Logged as DPO logs: rewards/chosen and rewards/rejected (beta x the mean log-probability, TRL's definition for
both), margins, accuracies, logps/chosen and logps/rejected (the means), ORPO also nll_loss and log_odds_ratio.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import Trainer

from dsft.train.trl_stage import DsftTrlTrainer

REFERENCE_FREE_LOSSES = ("simpo", "orpo")
"""dpo.loss values trained without a reference model."""


def simpo_losses(chosen_B: torch.Tensor, rejected_B: torch.Tensor, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO's loss per pair from the answers' mean token log-probabilities."""
    margin_B = beta * (chosen_B - rejected_B) - gamma
    return -F.logsigmoid(margin_B) * (1 - label_smoothing) - F.logsigmoid(-margin_B) * label_smoothing


def log_odds_ratio(chosen_B: torch.Tensor, rejected_B: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds of the chosen answer against the rejected one, from mean token log-probabilities (< 0)."""
    chosen_B, rejected_B = chosen_B.float(), rejected_B.float()
    return (chosen_B - rejected_B) - (_log1mexp(chosen_B) - _log1mexp(rejected_B))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    # log(1 - exp(x)) for x < 0: the two forms are exact on either side of -log 2 (no cancellation).
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ReferenceFreeLoss(Trainer):
    """The loss of dpo.loss simpo or orpo as a Trainer's compute_loss, and DPO's metrics from it."""

    def __init__(self, *args, preference_loss: str, beta: float, simpo_gamma: float, label_smoothing: float,
                 router_aux_loss_coef: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.preference_loss, self.beta, self.simpo_gamma = preference_loss, beta, simpo_gamma
        self.label_smoothing, self.router_aux_loss_coef = label_smoothing, router_aux_loss_coef
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.loss_is_scaled_for_ga = False  # a mean over pairs: the Trainer divides it over accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        completion_mask_2BT = inputs["completion_mask"]
        labels_2BT = inputs["input_ids"].masked_fill(completion_mask_2BT == 0, -100)
        extra = {"output_router_logits": True} if self.router_aux_loss_coef else {}
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels_2BT,
                        fused_lm_head=True, use_cache=False, **extra)
        answer_mask_2BT = completion_mask_2BT[:, 1:].to(outputs.log_probs.dtype)
        token_logps_2BT = outputs.log_probs[:, -answer_mask_2BT.shape[1]:]  # zero where the label is ignored
        mean_logps_2B = token_logps_2BT.sum(1) / answer_mask_2BT.sum(1).clamp(min=1)
        chosen_B, rejected_B = mean_logps_2B.chunk(2)
        mode = "train" if model.training else "eval"
        if self.preference_loss == "simpo":
            loss = simpo_losses(chosen_B, rejected_B, self.beta, self.simpo_gamma, self.label_smoothing).mean()
        else:
            chosen_tokens_BT, chosen_mask_BT = token_logps_2BT.chunk(2)[0], answer_mask_2BT.chunk(2)[0]
            nll = -(chosen_tokens_BT * chosen_mask_BT).sum() / chosen_mask_BT.sum().clamp(min=1)
            odds_B = log_odds_ratio(chosen_B, rejected_B)
            loss = nll - self.beta * F.logsigmoid(odds_B).mean()
            self._record(mode, {"nll_loss": nll, "log_odds_ratio": odds_B.mean()})
        if self.router_aux_loss_coef:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        self._record_rewards(mode, chosen_B, rejected_B)
        return (loss, outputs) if return_outputs else loss

    def _record_rewards(self, mode: str, chosen_B: torch.Tensor, rejected_B: torch.Tensor) -> None:
        chosen_rewards_B, rejected_rewards_B = self.beta * chosen_B.detach(), self.beta * rejected_B.detach()
        self._record(mode, {
            "rewards/chosen": chosen_rewards_B.mean(), "rewards/rejected": rejected_rewards_B.mean(),
            "rewards/margins": (chosen_rewards_B - rejected_rewards_B).mean(),
            "rewards/accuracies": (chosen_rewards_B > rejected_rewards_B).float().mean(),
            "logps/chosen": chosen_B.mean(), "logps/rejected": rejected_B.mean(),
        })

    def _record(self, mode: str, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The Trainer's own step would look for labels and return logits; the loss is the prediction here.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The means of the micro-batches since the last log, eval_ prefixed in an evaluation (as TRL's trainers log).
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{key}": sum(values) / len(values) for key, values in self._metrics[mode].items()})
        super().log(logs, start_time)
        self._metrics[mode].clear()


class ReferenceFreeTrainer(DsftTrlTrainer, ReferenceFreeLoss):
    """ReferenceFreeLoss with dsft's staged checkpoints, sample ledger, guards and equal weight per pair."""

    ref_model = None
    """No reference model (what the packing of DPO batches, packed_pairs.pack_trainer_forwards, asks)."""

    def __init__(self, *args, **kwargs):
        from peft import PeftModel
        from trl.trainer.utils import add_fused_lm_head

        super().__init__(*args, **kwargs)
        model = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        add_fused_lm_head(model)  # this instance's forward only: generation and plain forwards are unchanged
