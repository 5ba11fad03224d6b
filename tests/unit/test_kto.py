"""KTO: labelled records to rows, and the loss dsft trains with equal to KTO's formula on a fixed batch.

The trainer is the one build_kto_trainer makes (TRL's KTOTrainer with dsft's rows, collator and reference). The
loss is written out from the policy's and the reference's summed answer log-probabilities (plain forward
logits): with r = log pi(y|x) - log ref(y|x) and the KL estimate z = max(0, mean over the batch of the same
log-ratio on the mismatched (prompt, answer) rows), a desirable answer costs w_d (1 - sigmoid(beta (r - z))), an
undesirable one w_u (1 - sigmoid(beta (z - r))); apo_zero_unpaired drops z and costs sigmoid(beta r) for an
undesirable answer. The mean over the batch."""

import re

import pytest
import torch
from rich.console import Console

from dsft.config import RunConfig
from dsft.data.kto_data import to_labelled, with_kl_completions
from dsft.data.preference_data import encode_answer
from dsft.data.read import RawRecord
from dsft.errors import DsftError
from dsft.models.load import build_model
from dsft.train.kto import build_kto_trainer
from dsft.train.trl_stage import reference_model

BETA = 0.2
RECORDS = [
    {"messages": [{"role": "user", "content": "what is the answer?"}, {"role": "assistant", "content": "4"}], "label": True},
    {"instruction": "请回答 问题", "output": "答案 37", "label": False},
    {"prompt": "hello question", "completion": "exact sevens", "label": True},  # TRL's unpaired layout
    {"conversations": [{"from": "human", "value": "what is 74 + 2?"}, {"from": "gpt", "value": "the question"}],
     "label": False},
]


def rows(tokenizer):
    encoded = []
    for i, data in enumerate(RECORDS):
        item = to_labelled(RawRecord(data, f"kto.jsonl:{i + 1}"))
        prompt_ids, completion_ids = encode_answer(item.prompt, item.answer, "deepseek_v3", tokenizer)
        encoded.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": item.desirable})
    return with_kl_completions(encoded, batch_size=4)


def test_records_in_every_layout_and_the_kl_rotation(tokenizer):
    batch = rows(tokenizer)
    assert [row["label"] for row in batch] == [True, False, True, False]
    assert [row["KL_completion_ids"] for row in batch] == [batch[i - 1]["completion_ids"] for i in range(4)]
    assert with_kl_completions([{"completion_ids": [1]}, {"completion_ids": [2]}, {"completion_ids": [3]}], 2) == [
        {"completion_ids": [1], "KL_completion_ids": [2]}, {"completion_ids": [2], "KL_completion_ids": [1]},
        {"completion_ids": [3], "KL_completion_ids": [3]}]
    for bad, words in (({**RECORDS[0], "label": "yes"}, "label true (a desirable answer) or false"),
                       ({k: v for k, v in RECORDS[0].items() if k != "label"}, "got missing")):
        with pytest.raises(DsftError, match=f"kto.jsonl:9: field 'label': .*{re.escape(words)}"):
            to_labelled(RawRecord(bad, "kto.jsonl:9"))


def run_config(tmp_path, loss: str, desirable_weight: float) -> RunConfig:
    return RunConfig.model_validate({
        "stage": "kto", "model": {"preset": "tiny-qwen2", "dtype": "float32"},
        "data": {"train_files": ["unused.jsonl"], "chat_template": "deepseek_v3"},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
        "kto": {"beta": BETA, "loss": loss, "desirable_weight": desirable_weight, "undesirable_weight": 0.7},
        "train": {"seed": 0, "tensorboard": False, "batch_size": 4}, "output": {"dir": str(tmp_path / "run")},
    })


def summed_logps(model, ids_BL, completion_mask_BL, attention_BL) -> torch.Tensor:
    logits = model(input_ids=ids_BL, attention_mask=attention_BL).logits.float()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids_BL[:, 1:, None]).squeeze(-1)
    return (token_logps * completion_mask_BL[:, 1:]).sum(-1)


@pytest.mark.parametrize("loss, desirable_weight", [("kto", 1.3), ("apo_zero_unpaired", 1.0)])
def test_kto_loss_equals_its_formula(tmp_path, tokenizer, loss, desirable_weight):
    config = run_config(tmp_path, loss, desirable_weight)
    policy = build_model(config.model, tokenizer, 0)
    reference = reference_model(config, policy, tokenizer, None)
    trainer, _ = build_kto_trainer(config, tmp_path, policy, reference, tokenizer, rows(tokenizer), [],
                                   Console(quiet=True))
    model = trainer.model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # a fresh adapter (B = 0) would leave the policy equal to the reference
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    batch = trainer.data_collator(rows(tokenizer))
    # A few steps up the mismatched answers' likelihood, so the KL estimate is positive and counts (clamped at 0,
    # a random perturbation leaves it negative).
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        (-summed_logps(model, batch["KL_input_ids"], batch["KL_completion_mask"], batch["KL_attention_mask"]).sum()).backward()
        optimizer.step()
    with torch.no_grad():
        dsft_loss = trainer.compute_loss(model, dict(batch))
        sides = {}
        for prefix in ("", "KL_"):
            args = (batch[f"{prefix}input_ids"], batch[f"{prefix}completion_mask"], batch[f"{prefix}attention_mask"])
            policy_B = summed_logps(model, *args)
            with model.disable_adapter():
                sides[prefix] = policy_B - summed_logps(model, *args)
    r, label = sides[""], batch["label"].bool()
    assert r.abs().max() > 0.01  # the perturbed adapter moved the policy
    assert sides["KL_"].mean() > 0.05  # the KL term takes part
    z = sides["KL_"].mean().clamp(min=0) if loss == "kto" else torch.tensor(0.0)
    desirable = desirable_weight * (1 - torch.sigmoid(BETA * (r[label] - z)))
    undesirable = 0.7 * ((1 - torch.sigmoid(BETA * (z - r[~label]))) if loss == "kto" else torch.sigmoid(BETA * r[~label]))
    torch.testing.assert_close(dsft_loss, torch.cat([desirable, undesirable]).mean(), rtol=1e-5, atol=1e-6)
