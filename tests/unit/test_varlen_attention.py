"""dsft's varlen attention (dsft.models.varlen_attention): sequence bounds by hand; on CPU (SDPA per sequence) a
packed row gives the loss and gradients of transformers' block-diagonal mask and of the same samples padded, for
GQA (Qwen2), MLA (DeepSeek-V3, whose value heads are narrower) and Llama; padded batches and generation run sdpa;
the speed plan picks it for packed rows on CUDA; on a GPU the flash kernel equals the per-sequence fallback.

Tolerances: both sides run in this process, on whatever CPU path it has, through sums of different shapes (one row of
many sequences against padded rows), so they are equal up to rounding, not bitwise; one forward and backward, no
optimizer step, so the gap stays at rounding size: loss rtol 1e-5, gradients rtol 1e-4 hold on each CPU path the
suite is checked on (README, Tests)."""

import importlib.util

import pytest
import torch

from dsft.data.packing import PackedCollator, packed_rows
from dsft.models import varlen_attention
from dsft.models.kernels import resolve_speed_plan
from dsft.models.presets import build_preset
from dsft.models.varlen_attention import register_varlen_attention, sequence_bounds

_per_sequence_sdpa = varlen_attention._per_sequence_sdpa  # the fallback itself, before any test patches it


def test_bounds_start_at_each_row_and_each_restart():
    cu_seqlens, longest = sequence_bounds(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]))
    assert cu_seqlens.tolist() == [0, 3, 5, 7, 10] and cu_seqlens.dtype == torch.int32 and longest == 3
    assert sequence_bounds(torch.tensor([[0, 1, 2], [0, 1, 2]])) is None  # one sequence a row: sdpa runs
    assert sequence_bounds(torch.tensor([[3, 4, 5]])) is None  # a left-padded row's positions need not start at 0
    shared = torch.tensor([[0, 1, 0]])  # (1, L) position ids shared by 2 rows, as transformers passes them
    assert sequence_bounds(shared, rows=2)[0].tolist() == [0, 2, 3, 5, 6]


def samples(tokenizer) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for length in (9, 4, 13, 6, 11):
        ids = torch.randint(10, len(tokenizer), (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})
    return out


def padded(rows: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    return {"input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                            for r in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])}


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-deepseek-v3", "tiny-llama"])
def test_packed_rows_under_varlen_equal_the_mask_and_padding(tokenizer, monkeypatch, preset):
    rows = samples(tokenizer)
    model = build_preset(preset, tokenizer, seed=0, dtype=torch.float32)
    packed = PackedCollator(pad_token_id=0)(packed_rows(rows, capacity=24))
    assert packed["input_ids"].shape[0] == 2  # two rows, the second ending in padding (its own sequence)
    model.set_attn_implementation("sdpa")
    padded_loss, padded_grads = loss_and_grads(model, padded(rows))
    mask_loss, mask_grads = loss_and_grads(model, packed)
    model.set_attn_implementation(register_varlen_attention())
    sequences = []
    monkeypatch.setattr(varlen_attention, "_per_sequence_sdpa", lambda q, k, v, cu, *rest:
                        sequences.append(len(cu) - 1) or _per_sequence_sdpa(q, k, v, cu, *rest))
    loss, grads = loss_and_grads(model, packed)
    assert sequences and set(sequences) == {6}  # in every layer: the 5 samples and the padding of row 2
    for expected_loss, expected_grads in ((mask_loss, mask_grads), (padded_loss, padded_grads)):
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == expected_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_padded_batches_and_generation_run_sdpa(tokenizer, monkeypatch):
    model = build_preset("tiny-qwen2", tokenizer, seed=0, dtype=torch.float32)
    batch = padded(samples(tokenizer))
    tokenizer.padding_side = "left"
    prompts = tokenizer(["hello", "what is the answer"], return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    expected_loss = model(**batch).loss
    expected_ids = model.generate(**prompts, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.set_attn_implementation(register_varlen_attention())
    monkeypatch.setattr(varlen_attention, "_per_sequence_sdpa", lambda *args: pytest.fail("no packed row here"))
    torch.testing.assert_close(model(**batch).loss, expected_loss)
    ids = model.generate(**prompts, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert ids.tolist() == expected_ids.tolist()


def test_speed_plan_picks_a_varlen_kernel_for_packed_rows_on_cuda(tokenizer, monkeypatch):
    from dsft.config import TrainConfig

    model = build_preset("tiny-qwen2", tokenizer, seed=0, dtype=torch.float32)
    packing = TrainConfig(packing=True)
    has_flash_attn = {"flash_attn": None}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: has_flash_attn[name] if name in has_flash_attn else real_find_spec(name, *a))
    assert resolve_speed_plan(packing, model, cuda=True).attention == "varlen"
    has_flash_attn["flash_attn"] = real_find_spec("torch")  # any spec: flash-attn "installed"
    assert resolve_speed_plan(packing, model, cuda=True).attention == "flash_attention_2"
    cpu = resolve_speed_plan(packing, model, cuda=False)
    assert cpu.attention is None and "attention unchanged (no CUDA: the block-diagonal mask)" in cpu.line()
    chosen = resolve_speed_plan(packing, model, cuda=True, attn_implementation="sdpa")
    assert chosen.attention is None and "model.attn_implementation: sdpa" in chosen.line()
    assert resolve_speed_plan(TrainConfig(), model, cuda=True).attention is None


def _sequences_attention(query_NHD, key_NHD, value_NHD, cu_seqlens, scale, causal: bool, gqa: bool):
    """What varlen_attn computes, for the stand-ins below: SDPA on each sequence of the flattened tokens."""
    outputs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query_NHD, key_NHD, value_NHD))
        outputs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                                        enable_gqa=gqa).transpose(0, 1))
    return torch.cat(outputs)


def torch_2_10_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert key.shape[1] == query.shape[1] and value.shape[-1] == query.shape[-1]  # one head count, one head size
    return _sequences_attention(query, key, value, cu_seq_q, None, is_causal, False)


def torch_2_12_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size == (-1, 0) and value.shape[-1] == query.shape[-1]
    assert enable_gqa or key.shape[1] == query.shape[1]
    return _sequences_attention(query, key, value, cu_seq_q, scale, True, enable_gqa)


@pytest.mark.parametrize("kernel", [torch_2_10_varlen, torch_2_12_varlen])
@pytest.mark.parametrize("value_dim, key_heads", [(32, 2), (16, 4)])  # GQA; MLA's narrower value heads
def test_the_kernel_call_fits_each_torch_signature(monkeypatch, kernel, value_dim, key_heads):
    """How the flash kernel is called (scale, causal window, fewer key heads, narrower values) for torch 2.10's
    signature and 2.12's, checked on CPU against the per-sequence fallback with stand-ins that compute what the
    kernel computes; the flash kernel itself runs in the gpu test below."""
    import torch.nn.attention.varlen as torch_varlen

    monkeypatch.setattr(torch_varlen, "varlen_attn", kernel)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 20, 32, generator=generator)
    key = torch.randn(2, key_heads, 20, 32, generator=generator)
    value = torch.randn(2, key_heads, 20, value_dim, generator=generator)
    cu_seqlens = torch.tensor([0, 7, 20, 33, 40], dtype=torch.int32)
    actual = varlen_attention._varlen_kernel(query, key, value, cu_seqlens, 13, 0.1, None)
    torch.testing.assert_close(actual, _per_sequence_sdpa(query, key, value, cu_seqlens, 0.1, 0.0, None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("value_dim, key_heads", [(32, 2), (16, 4)])  # GQA; MLA's narrower value heads
def test_flash_kernel_equals_the_per_sequence_fallback(value_dim, key_heads):
    generator = torch.Generator(device="cuda").manual_seed(0)
    query, key = (torch.randn(1, heads, 40, 32, device="cuda", dtype=torch.bfloat16, generator=generator,
                              requires_grad=True) for heads in (4, key_heads))
    value = torch.randn(1, key_heads, 40, value_dim, device="cuda", dtype=torch.bfloat16, generator=generator,
                        requires_grad=True)
    cu_seqlens = torch.tensor([0, 7, 20, 33, 40], device="cuda", dtype=torch.int32)
    kernel = varlen_attention._varlen_kernel(query, key, value, cu_seqlens, 13, 32 ** -0.5, None)
    fallback = _per_sequence_sdpa(query.float(), key.float(), value.float(), cu_seqlens, 32 ** -0.5, 0.0, None)
    torch.testing.assert_close(kernel.float(), fallback, rtol=2e-2, atol=2e-2)
    kernel_grads = torch.autograd.grad(kernel.float().square().sum(), (query, key, value))
    fallback_grads = torch.autograd.grad(fallback.square().sum(), (query, key, value))
    for actual, expected in zip(kernel_grads, fallback_grads):
        torch.testing.assert_close(actual.float(), expected.float(), rtol=5e-2, atol=5e-2)
