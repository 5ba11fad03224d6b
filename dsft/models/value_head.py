"""PPO's value model: one linear layer on the policy's last hidden state (the critic shares the backbone).

Sharing the backbone costs no second model; the head starts at zero (every value 0), so the first advantages
are the discounted rewards themselves and the value loss falls as the head learns. Saved beside the policy
as value_head.safetensors; plain transformers ignores the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(torch.nn.Module):
    """V(s_t) from the hidden state at position t (the state the token at t + 1 is sampled from), in float32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_BTH):
        return self.linear(hidden_BTH.float()).squeeze(-1)


def model_hidden_size(model) -> int:
    """The width of the model's hidden states (text config of any HF causal LM, PEFT-wrapped or not)."""
    return model.config.get_text_config().hidden_size


def save_value_head(head: ValueHead, run_dir: Path) -> None:
    """Write the head's weights into run_dir/value_head.safetensors (written aside, then renamed into place)."""
    from safetensors.torch import save_file

    tmp = Path(run_dir) / (VALUE_HEAD_FILE + ".tmp")
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}, str(tmp))
    os.replace(tmp, Path(run_dir) / VALUE_HEAD_FILE)
