"""Pure pieces of generation and exact match."""

import torch

from dsft.models.generate import DecodeSettings, pad_left, split_reasoning


def test_split_reasoning():
    assert split_reasoning("5 x 1000 = 5000.\n</think>\n\n5000 m") == ("5 x 1000 = 5000.", "5000 m")
    assert split_reasoning("<think>\nhm\n</think>\n\n42") == ("hm", "42")
    assert split_reasoning("  42 \n") == (None, "42")


def test_greedy_by_default_and_sampling_flags_only_when_sampling():
    assert DecodeSettings().generate_kwargs() == {"max_new_tokens": 256, "do_sample": False}
    sampled = DecodeSettings(max_new_tokens=8, do_sample=True, temperature=0.5, top_p=0.9, top_k=5).generate_kwargs()
    assert sampled == {"max_new_tokens": 8, "do_sample": True, "temperature": 0.5, "top_p": 0.9, "top_k": 5}


def test_left_padding():
    input_ids, attention_mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert input_ids.dtype == torch.long


def test_a_failing_stream_raises_instead_of_waiting_forever():
    import pytest

    from dsft.errors import DsftError
    from dsft.models.generate import stream_reply

    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, **kwargs):
            raise ValueError("max_new_tokens must be greater than 0")

    class Tok:
        pad_token_id = eos_token_id = 0

        def decode(self, ids, **kwargs):
            return ""

    with pytest.raises(DsftError, match="max_new_tokens must be greater than 0"):
        list(stream_reply(Failing(), Tok(), [1, 2], DecodeSettings(max_new_tokens=0)))
