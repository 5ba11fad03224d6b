"""PPO's forward (dsft.train.ppo.forward): the LM head scores the completion window only, and the log-prob logits
and values equal those read from a full forward of the same left-padded rows, packed or not."""

import pytest
import torch

from dsft.models.packed_forward import pack_model
from dsft.models.presets import build_preset
from dsft.models.value_head import ValueHead
from dsft.train.ppo import forward


@pytest.mark.parametrize("packed", [False, True])
def test_lm_head_runs_on_the_completion_window_only(tokenizer, packed):
    model = build_preset("tiny-qwen2", tokenizer, seed=0, dtype=torch.float32)
    value_head = ValueHead(model.config.hidden_size)
    tokenizer.padding_side = "left"
    batch = tokenizer(["hello, what is the answer?", "what is the answer 12 + 3? think exact sevens"],
                      return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    tokenizer.padding_side = "right"
    completion_width = 3
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    full = model(**batch, position_ids=positions, output_hidden_states=True)
    window = slice(-completion_width - 1, -1)
    expected_logits = full.logits[:, window] / 0.7
    expected_values = value_head(full.hidden_states[-1][:, window])
    if packed:
        pack_model(model)
    head_inputs = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_inputs.append(args[0].shape[1]))
    logits, values = forward(model, value_head, batch["input_ids"], batch["attention_mask"], completion_width, 0.7)
    assert head_inputs == [completion_width + 1]
    assert logits.shape == (2, completion_width, model.config.vocab_size)
    assert batch["attention_mask"][:, -completion_width - 1:].bool().all()  # padding lies left, before the window
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(values, expected_values, rtol=1e-4, atol=1e-5)
