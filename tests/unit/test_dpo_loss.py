"""The DPO loss dsft trains with equals an independent hand computation.

"The path dsft uses" is the trainer build_dpo_trainer makes (TRL's DPOTrainer with dsft's collator, rows and
reference); its compute_loss on a fixed batch is compared with the loss written out from the policy's and the
reference's summed answer log-probabilities, computed here from plain forward logits (log_softmax, gather):
sigmoid -log sigmoid(beta delta); TRL's IPO (each side's log-ratio divided by its answer length, then
(delta - 1 / (2 beta))^2); robust ((1 - e) -log sigmoid(beta delta) + e log sigmoid(-beta delta)) / (1 - 2e);
and each further DPO-family loss of dpo.loss as hand_loss writes it out.
The policy is perturbed first (LoRA B matrices, or every weight for full), so policy and reference differ.
With LoRA the reference is the policy with its adapter disabled: no reference model, no second adapter.
"""

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from dsft.config import RunConfig
from dsft.data.preference import to_pair
from dsft.data.preference_data import encode_pair
from dsft.data.read import RawRecord
from dsft.models.load import build_model
from dsft.train.dpo import build_dpo_trainer, build_reference

BETA = 0.3
PAIRS = [
    ("what is the answer?", "the answer is 4", "hello"),
    ("请回答 问题", "答案 37", "模型 训练 and think and think"),
    ("hello question", "exact", "sevens sevens"),
    ("what is 74 + 2?", "76", "the question is the question"),
]


def run_config(tmp_path, method: str, loss: str, label_smoothing: float = 0.0) -> RunConfig:
    return RunConfig.model_validate({
        "stage": "dpo",
        "model": {"preset": "tiny-qwen2", "dtype": "float32"},
        "data": {"train_files": ["unused.jsonl"], "chat_template": "deepseek_v3"},
        "method": {"type": method, **({"lora": {"r": 4, "alpha": 8}} if method == "lora" else {})},
        "dpo": {"beta": BETA, "loss": loss, "label_smoothing": label_smoothing},
        "train": {"seed": 0, "tensorboard": False, "batch_size": 4},
        "output": {"dir": str(tmp_path / "run")},
    })


@pytest.fixture(scope="module")
def rows(tokenizer):
    records = [RawRecord({"instruction": q, "chosen": c, "rejected": r}, f"pairs.jsonl:{i + 1}")
               for i, (q, c, r) in enumerate(PAIRS)]
    return [encode_pair(to_pair(record), "deepseek_v3", tokenizer).as_row() for record in records]


def dsft_trainer(tmp_path, tokenizer, rows, method: str, loss: str, label_smoothing: float = 0.0):
    config = run_config(tmp_path, method, loss, label_smoothing)
    policy = build_model(config.model, tokenizer, config.train.seed)
    reference = build_reference(config, policy, tokenizer)
    trainer, _ = build_dpo_trainer(config, tmp_path, policy, reference, tokenizer, rows, [], Console(quiet=True))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if method == "full" or "lora_B" in name:  # a fresh adapter (B = 0) would leave policy == reference
                parameter.add_((0.05 if method == "full" else 0.5) * torch.randn(parameter.shape, generator=generator))
    return trainer


def answer_logps(model, batch) -> torch.Tensor:
    """Summed log-probability of each sequence's answer tokens (completion_mask), from the plain forward logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(-1)


def hand_loss(loss: str, policy_2B, reference_2B, completion_mask, label_smoothing: float) -> torch.Tensor:
    """Each loss written out from the papers' definitions as TRL states them (per pair, then the batch mean)."""
    b, e = BETA, label_smoothing
    logratio_2B = policy_2B - reference_2B
    chosen, rejected = logratio_2B.chunk(2)
    delta = chosen - rejected
    length_chosen, length_rejected = completion_mask.sum(-1).chunk(2)
    policy_c, policy_r = policy_2B.chunk(2)
    reference_c, reference_r = reference_2B.chunk(2)
    sig, logsig = torch.sigmoid, F.logsigmoid
    if loss in ("aot", "aot_unpaired"):  # optimal transport: the batch's sorted margins matched
        sorted_delta = (torch.sort(policy_c - policy_r).values - torch.sort(reference_c - reference_r).values
                        if loss == "aot" else torch.sort(chosen).values - torch.sort(rejected).values)
    losses = {
        "sigmoid": lambda: -logsig(b * delta),
        "robust": lambda: (-(1 - e) * logsig(b * delta) + e * logsig(-b * delta)) / (1 - 2 * e),
        "ipo": lambda: (chosen / length_chosen - rejected / length_rejected - 1 / (2 * b)) ** 2,
        "hinge": lambda: torch.relu(1 - b * delta),
        "sigmoid_norm": lambda: -logsig(b * (chosen / length_chosen - rejected / length_rejected)),
        "exo_pair": lambda: sig(b * delta) * (logsig(b * delta) - torch.log1p(torch.tensor(-e)))
        + sig(-b * delta) * (logsig(-b * delta) - torch.log(torch.tensor(e))),
        "nca_pair": lambda: -logsig(b * chosen) - 0.5 * logsig(-b * chosen) - 0.5 * logsig(-b * rejected),
        "bco_pair": lambda: -logsig(b * chosen) - logsig(-b * rejected),
        "sppo_hard": lambda: (chosen - 0.5 / b) ** 2 + (rejected + 0.5 / b) ** 2,
        "aot": lambda: -logsig(b * sorted_delta) * (1 - e) - logsig(-b * sorted_delta) * e,
        "aot_unpaired": lambda: -logsig(b * sorted_delta) * (1 - e) - logsig(-b * sorted_delta) * e,
        "apo_zero": lambda: 1 - sig(b * chosen) + sig(b * rejected),
        "apo_down": lambda: sig(b * chosen) + 1 - sig(b * delta),
        "discopop": lambda: -logsig(b * delta) * (1 - sig(b * delta / 0.05)) + torch.exp(-b * delta) * sig(b * delta / 0.05),
    }
    return losses[loss]().mean()


@pytest.mark.parametrize("loss, label_smoothing", [
    ("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.2), ("hinge", 0.0), ("sigmoid_norm", 0.0), ("exo_pair", 1e-3),
    ("nca_pair", 0.0), ("bco_pair", 0.0), ("sppo_hard", 0.0), ("aot", 0.1), ("aot_unpaired", 0.0),
    ("apo_zero", 0.0), ("apo_down", 0.0), ("discopop", 0.0)])
def test_lora_dpo_loss_equals_hand_computation_with_adapter_disabled_reference(tmp_path, tokenizer, rows, loss,
                                                                               label_smoothing):
    trainer = dsft_trainer(tmp_path, tokenizer, rows, "lora", loss, label_smoothing)
    model = trainer.model
    # The reference is the policy itself with the adapter off: no reference model and no copied "ref" adapter.
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        dsft_loss = trainer.compute_loss(model, dict(batch))
        policy_2B = answer_logps(model, batch)
        with model.disable_adapter():
            reference_2B = answer_logps(model, batch)
    expected = hand_loss(loss, policy_2B, reference_2B, batch["completion_mask"], label_smoothing)
    assert (policy_2B - reference_2B).abs().max() > 0.01  # the perturbed adapter moved the policy
    torch.testing.assert_close(dsft_loss, expected, rtol=1e-5, atol=1e-6)


def test_full_dpo_loss_uses_a_frozen_copy_of_the_starting_model(tmp_path, tokenizer, rows):
    trainer = dsft_trainer(tmp_path, tokenizer, rows, "full", "sigmoid")
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    # Rebuilt from the same seed: the starting weights, independent of the trainer's copy.
    start = build_model(run_config(tmp_path, "full", "sigmoid").model, tokenizer, 0)
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        dsft_loss = trainer.compute_loss(trainer.model, dict(batch))
        expected = hand_loss("sigmoid", answer_logps(trainer.model, batch), answer_logps(start, batch),
                             batch["completion_mask"], 0.0)
    torch.testing.assert_close(dsft_loss, expected, rtol=1e-5, atol=1e-6)
