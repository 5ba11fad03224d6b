"""FGM and PGD on the input embeddings: gradients, perturbation norms, the hook's lifetime, frozen embeddings."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsft.config import AdversarialConfig, MethodConfig
from dsft.models.method import apply_method
from dsft.models.presets import preset_config
from dsft.train.adversarial import EmbeddingAdversary, build_adversary, project_per_row, row_norms, unit_per_row


def tiny_model(seed: int = 0):
    config = preset_config("tiny-qwen2", vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 128, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding in the second row
    input_ids[1, 8:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Passes:
    """Forward and backward passes of one batch, recording the perturbation each pass saw."""

    def __init__(self, model, batch, adversary=None):
        self.model, self.batch, self.adversary = model, batch, adversary
        self.deltas_BLD = []

    def __call__(self):
        if self.adversary is not None and self.adversary.delta_BLD is not None:
            self.deltas_BLD.append(self.adversary.delta_BLD.clone())
        loss = self.model(**self.batch).loss
        loss.backward()
        return loss.detach()


def assert_doubled(got: dict, clean: dict) -> None:
    """got == 2 x clean up to float32 rounding (relative to each tensor's largest entry)."""
    assert set(got) == set(clean)
    for name, grad in clean.items():
        torch.testing.assert_close(got[name], 2 * grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def clean_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    Passes(model, batch)()
    result = grads(model)
    model.zero_grad(set_to_none=True)
    return result


def attack(model, batch, **config):
    adversary = EmbeddingAdversary(AdversarialConfig(**config), model)
    passes = Passes(model, batch, adversary)
    loss = adversary.step(passes, passes)
    return loss, passes.deltas_BLD


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_a_vanishing_attack_doubles_the_clean_gradients(batch, method):
    # PGD keeps only its last ascent pass's gradients: 2x too, not (1 + pgd_steps)x.
    model = tiny_model()
    expected = clean_grads(model, batch)
    attack(model, batch, method=method, epsilon=1e-7, pgd_steps=3, pgd_alpha=1e-7)
    assert len(expected) == len(list(model.parameters()))
    assert_doubled(grads(model), expected)


def test_fgm_perturbs_each_row_by_epsilon_along_the_gradient(batch):
    model = tiny_model()
    _, deltas_BLD = attack(model, batch, method="fgm", epsilon=0.5)
    assert len(deltas_BLD) == 1
    torch.testing.assert_close(row_norms(deltas_BLD[0]).flatten(), torch.full((2,), 0.5))
    # The direction is the gradient at the embedding output of the clean pass.
    model.zero_grad(set_to_none=True)
    embeds_BLD = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    model(inputs_embeds=embeds_BLD, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    torch.testing.assert_close(deltas_BLD[0], 0.5 * unit_per_row(embeds_BLD.grad))
    assert not deltas_BLD[0][1, 8:].any()  # padding gets no gradient, so no perturbation


def test_pgd_stays_within_the_epsilon_ball(batch):
    model = tiny_model()
    _, deltas_BLD = attack(model, batch, method="pgd", epsilon=0.5, pgd_steps=4, pgd_alpha=0.3)
    norms = [row_norms(d).flatten() for d in deltas_BLD]
    assert len(norms) == 4
    torch.testing.assert_close(norms[0], torch.full((2,), 0.3))
    assert all(bool((n <= 0.5 + 1e-6).all()) for n in norms)
    torch.testing.assert_close(norms[-1], torch.full((2,), 0.5))  # 4 x 0.3 along similar directions: projected
    assert all(p.requires_grad for p in model.parameters())  # the ascent passes froze them only for a moment


def test_the_hook_lives_only_during_the_step(batch):
    model = tiny_model()
    embeddings = model.get_input_embeddings()
    with torch.no_grad():
        before = model(**batch).logits
    clean_loss, _ = attack(model, batch, method="fgm", epsilon=1.0)
    assert not embeddings._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
        assert torch.equal(clean_loss, model(**batch).loss)  # the step reports the clean loss


def test_lora_attacks_frozen_embeddings_and_doubles_the_adapter_gradients(batch):
    model = apply_method(tiny_model(), MethodConfig(type="lora", lora={"r": 4}))
    assert not model.get_input_embeddings().weight.requires_grad
    expected = clean_grads(model, batch)
    assert expected and all("lora_" in name for name in expected)
    _, deltas_BLD = attack(model, batch, method="fgm", epsilon=1e-7)
    torch.testing.assert_close(row_norms(deltas_BLD[0]).flatten(), torch.full((2,), 1e-7))
    assert_doubled(grads(model), expected)


def test_method_none_builds_nothing():
    assert build_adversary(AdversarialConfig(), tiny_model()) is None


def test_projection_scales_only_rows_outside_the_ball():
    delta_BLD = torch.tensor([[[3.0, 4.0]], [[0.3, 0.4]]])
    torch.testing.assert_close(project_per_row(delta_BLD, 1.0), torch.tensor([[[0.6, 0.8]], [[0.3, 0.4]]]))
    assert torch.equal(unit_per_row(torch.zeros(1, 2, 2)), torch.zeros(1, 2, 2))
