"""dpo.loss simpo and orpo: the loss of the trainer dsft builds equals TRL's own on a fixed batch.

The reference is TRL's CPOTrainer.cpo_loss (loss_type simpo, the SimPO loss) and ORPOTrainer.odds_ratio_loss,
called on the answers' mean token log-probabilities computed here from plain forward logits (log_softmax, gather);
ORPO adds the chosen answers' per-token NLL (dsft's choice: answers only, see dsft/train/reference_free.py). No
reference model exists in either run, and the policy is perturbed first so the answers' scores differ."""

from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from rich.console import Console

from dsft.config import RunConfig
from dsft.models.load import build_model
from dsft.train.dpo import build_dpo_trainer, build_reference
from dsft.train.reference_free import ReferenceFreeTrainer, log_odds_ratio

from .test_dpo_loss import rows  # noqa: F401 (the fixed batch of test_dpo_loss)

BETA, GAMMA = 2.0, 0.7


def run_config(tmp_path, method: str, loss: str, **dpo) -> RunConfig:
    return RunConfig.model_validate({
        "stage": "dpo", "model": {"preset": "tiny-qwen2", "dtype": "float32"},
        "data": {"train_files": ["unused.jsonl"], "chat_template": "deepseek_v3"},
        "method": {"type": method, **({"lora": {"r": 4, "alpha": 8}} if method == "lora" else {})},
        "dpo": {"beta": BETA, "loss": loss, **dpo},
        "train": {"seed": 0, "tensorboard": False, "batch_size": 4}, "output": {"dir": str(tmp_path / "run")},
    })


def built(tmp_path, tokenizer, rows, method: str, loss: str, **dpo):  # noqa: F811
    from dsft.models.method import apply_method

    config = run_config(tmp_path, method, loss, **dpo)
    policy = build_model(config.model, tokenizer, config.train.seed)
    assert build_reference(config, policy, tokenizer) is None  # no copy of the model, whatever the method
    policy = apply_method(policy, config.method) if method == "lora" else policy
    trainer, _ = build_dpo_trainer(config, tmp_path, policy, None, tokenizer, rows, [], Console(quiet=True))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if method == "full" or "lora_B" in name:
                parameter.add_((0.05 if method == "full" else 0.5) * torch.randn(parameter.shape, generator=generator))
    return trainer


def mean_answer_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean log-probability of each sequence's answer tokens, the per-token NLL of the chosen answers)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].float()
    chosen_mask = mask.chunk(2)[0]
    nll = -(token_logps.chunk(2)[0] * chosen_mask).sum() / chosen_mask.sum()
    return (token_logps * mask).sum(-1) / mask.sum(-1), nll


def trl_loss(loss: str, means_2B: torch.Tensor, nll: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    chosen, rejected = means_2B.chunk(2)
    state = SimpleNamespace(beta=BETA, alpha=0.0, loss_type="simpo", simpo_gamma=GAMMA, label_smoothing=label_smoothing,
                            accelerator=SimpleNamespace(device=means_2B.device))
    if loss == "simpo":
        return CPOTrainer.cpo_loss(state, chosen, rejected)[0].mean()
    return nll - ORPOTrainer.odds_ratio_loss(state, chosen, rejected)[0].mean()


@pytest.mark.parametrize("method, loss, label_smoothing", [
    ("lora", "simpo", 0.0), ("lora", "simpo", 0.2), ("full", "simpo", 0.0), ("lora", "orpo", 0.0), ("full", "orpo", 0.0)])
def test_loss_equals_trls(tmp_path, tokenizer, rows, method, loss, label_smoothing):  # noqa: F811
    dpo = {"label_smoothing": label_smoothing} if label_smoothing else {}
    trainer = built(tmp_path, tokenizer, rows, method, loss, **({"simpo_gamma": GAMMA} if loss == "simpo" else {}), **dpo)
    assert isinstance(trainer, ReferenceFreeTrainer) and trainer.ref_model is None
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        dsft_loss = trainer.compute_loss(trainer.model, dict(batch))
        means_2B, nll = mean_answer_logps(trainer.model, batch)
    chosen, rejected = means_2B.chunk(2)
    assert (chosen - rejected).abs().min() > 1e-3  # the pairs' scores differ: the loss is not at a trivial point
    torch.testing.assert_close(dsft_loss, trl_loss(loss, means_2B, nll, label_smoothing), rtol=1e-5, atol=1e-6)
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    assert logged["rewards/margins"][-1] == pytest.approx(BETA * (chosen - rejected).mean().item(), rel=1e-5)
    if loss == "orpo":
        assert logged["log_odds_ratio"][-1] == pytest.approx(log_odds_ratio(chosen, rejected).mean().item(), rel=1e-5)


def test_the_loss_has_a_gradient_and_evaluation_reports_it(tmp_path, tokenizer, rows):  # noqa: F811
    trainer = built(tmp_path, tokenizer, rows, "lora", "orpo")
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(trainer.data_collator(rows)))
    loss.backward()
    grads = [p.grad for name, p in trainer.model.named_parameters() if "lora_A" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    evaluation_loss, _, _ = trainer.prediction_step(trainer.model.eval(), trainer.data_collator(rows), True)
    torch.testing.assert_close(evaluation_loss, loss.detach(), rtol=1e-5, atol=1e-6)


def test_settings_that_do_not_apply_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="dpo.simpo_gamma applies to loss simpo only"):
        run_config(tmp_path, "lora", "sigmoid", simpo_gamma=1.0)
    with pytest.raises(ValidationError, match="dpo.loss orpo uses no reference model; remove dpo.reference"):
        run_config(tmp_path, "lora", "orpo", reference="some/model")
    with pytest.raises(ValidationError, match="label_smoothing applies to losses"):
        run_config(tmp_path, "lora", "orpo", label_smoothing=0.1)
