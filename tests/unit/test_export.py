"""dsft export's streaming merge: equal to PEFT's merge weight by weight (LoRA on MLA attention, routed experts
and the router), tied embeddings untied, shards and index well formed, one tensor held at a time.

Tolerances: the streaming merge and PEFT's merge run in this process on the same CPU path and add the same low-rank
product to the same base weight, but compute B @ A in their own GEMM shapes (per expert, or stacked): rtol 1e-5 /
atol 1e-6 per weight, which holds on each CPU path the suite is checked on (README, Tests)."""

import json
import weakref
from contextlib import closing
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen2Config

from dsft.config import LoraConfig, MethodConfig
from dsft.errors import DsftError
from dsft.export.merge import MergeSources, plan_merge
from dsft.export.weights import PlannedTensor, parse_size, plan_shards, write_shards
from dsft.models.method import apply_method
from dsft.models.presets import build_preset


def _randomize_lora(peft_model, seed: int = 0) -> None:
    """B (and embedding factors) start at zero; random factors make every update count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _save(base, peft_config_or_method, tmp_path: Path):
    """Save base (as transformers does) and a LoRA adapter with random factors on it; returns the PEFT model."""
    base.save_pretrained(tmp_path / "base")
    if isinstance(peft_config_or_method, MethodConfig):
        peft_model = apply_method(base, peft_config_or_method)
    else:
        peft_model = get_peft_model(base, peft_config_or_method)
    _randomize_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


def _merge(tmp_path: Path, max_shard_bytes: int = 10**9, dtype=None):
    """Stream-merge tmp_path/adapter into tmp_path/base, into tmp_path/out (with the config the export writes)."""
    base_dir, adapter_dir, out_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    out_dir.mkdir()
    with closing(MergeSources(adapter_dir)) as sources:
        plan = plan_merge(base_dir, adapter_dir, base_dir, AutoModelForCausalLM, sources, dtype)
        summary = write_shards(plan.tensors, out_dir, max_shard_bytes)
    model_config = json.loads((base_dir / "config.json").read_text())
    if plan.untied:
        model_config["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(model_config))
    return plan, summary


def _stored(model_dir: Path) -> dict:
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(model_dir / name, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return tensors


def _tiny_qwen2(tie: bool = False):
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_streaming_merge_equals_peft_merge_weight_by_weight_on_deepseek_moe(tokenizer, tmp_path):
    base = build_preset("tiny-deepseek-v3", tokenizer, seed=0, dtype=torch.float32)
    # The router trained by LoRA (method.moe.router train, router_adapter lora): every kind of target is merged.
    method = MethodConfig(type="lora", lora=LoraConfig(r=4, alpha=8),
                          moe={"router": "train", "router_adapter": "lora"})
    peft_model = _save(base, method, tmp_path)
    adapted = {name.split(".lora_")[0] for name, _ in peft_model.named_parameters() if "lora_A" in name}
    assert any(name.endswith("mlp.experts") for name in adapted)  # routed experts (PEFT target_parameters)
    assert any(name.endswith("mlp.gate") for name in adapted) and any("kv_b_proj" in name for name in adapted)
    # The dense first layer's MLP and the shared experts, as parameter targets (models/moe_targets.py).
    assert any(name.endswith("layers.0.mlp.down_proj") for name in adapted)
    assert any(name.endswith("shared_experts.gate_proj") for name in adapted)
    ids = torch.randint(10, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits = peft_model(input_ids=ids).logits
    plan, summary = _merge(tmp_path, max_shard_bytes=500_000)

    # The checkpoint's own format: one tensor per expert and projection, the base's names and shapes.
    base_tensors, out_tensors = _stored(tmp_path / "base"), _stored(tmp_path / "out")
    assert {k: v.shape for k, v in out_tensors.items()} == {k: v.shape for k, v in base_tensors.items()}
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in out_tensors
    assert not torch.equal(out_tensors["model.layers.1.mlp.experts.5.up_proj.weight"],
                           base_tensors["model.layers.1.mlp.experts.5.up_proj.weight"])
    assert summary["shards"] > 1 and plan.untied == [] and plan.dropped == []

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = peft_model.merge_and_unload().state_dict()
    actual = merged.state_dict()
    assert actual.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(actual[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_the_adapter_changes_are_untied(tmp_path):
    base = _tiny_qwen2(tie=True)
    peft_config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "embed_tokens", "q_proj"])
    peft_model = _save(base, peft_config, tmp_path)
    assert "lm_head.weight" not in _stored(tmp_path / "base")  # the base stores the shared tensor once
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_logits = peft_model(input_ids=ids).logits
    plan, _ = _merge(tmp_path)
    assert plan.untied == ["lm_head.weight"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    with torch.no_grad():
        # The run's model: embeddings with their update on the input side, the head with its own on the output side.
        torch.testing.assert_close(merged(input_ids=ids).logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_rslora_rank_and_alpha_patterns_and_modules_to_save_merge_as_peft_does(tmp_path):
    peft_config = PeftLoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2},
                                 alpha_pattern={"v_proj": 3}, target_modules=["q_proj", "v_proj", "down_proj"],
                                 modules_to_save=["lm_head"])
    peft_model = _save(_tiny_qwen2(), peft_config, tmp_path)
    _merge(tmp_path)
    reference = peft_model.merge_and_unload().state_dict()
    actual = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert actual.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(actual[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_an_adapter_with_another_update_rule_is_not_merged(tmp_path):
    _save(_tiny_qwen2(), PeftLoraConfig(r=4, lora_bias=True, target_modules=["q_proj"]), tmp_path)
    with pytest.raises(DsftError, match="adapter option lora_bias is set.*export without --merge"):
        _merge(tmp_path)


def test_a_dora_merge_equals_peft_merge_and_unload(tmp_path):
    """DoRA: m * (W + delta) / ||W + delta|| row by row; PEFT's own merge is the reference."""
    peft_model = _save(_tiny_qwen2(), PeftLoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                     target_modules=["q_proj", "down_proj"]), tmp_path)
    _merge(tmp_path)
    expected = {k: v for k, v in peft_model.merge_and_unload().state_dict().items()}
    merged = _stored(tmp_path / "out")
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(merged[key], _stored(tmp_path / "base")[key], atol=1e-3)  # the update is there


def test_a_requested_dtype_applies_to_every_floating_tensor(tokenizer, tmp_path):
    base = build_preset("tiny-qwen2", tokenizer, seed=0, dtype=torch.float32)
    _save(base, MethodConfig(type="lora", lora=LoraConfig(r=4, alpha=8)), tmp_path)
    _, summary = _merge(tmp_path, dtype=torch.bfloat16)
    assert summary["dtypes"] == ["bfloat16"] and summary["shards"] == 1
    assert all(t.dtype == torch.bfloat16 for t in _stored(tmp_path / "out").values())


def test_plan_shards_groups_consecutive_tensors_up_to_the_limit():
    def planned(name, nbytes):
        return PlannedTensor(name, (nbytes,), torch.uint8, lambda: torch.zeros(nbytes, dtype=torch.uint8))

    tensors = [planned("a", 4), planned("b", 4), planned("c", 4), planned("big", 10), planned("d", 1)]
    groups = plan_shards(tensors, max_shard_bytes=8)
    assert [[t.name for t in group] for group in groups] == [["a", "b"], ["c"], ["big"], ["d"]]


def test_shards_and_index_are_what_transformers_writes(tmp_path):
    values = {f"w{i}": torch.full((i + 1, 3), float(i)) for i in range(5)}
    tensors = [PlannedTensor(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in values.items()]
    summary = write_shards(tensors, tmp_path, max_shard_bytes=40)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert summary["shards"] == len(set(index["weight_map"].values())) == 4
    assert index["metadata"]["total_size"] == summary["total_bytes"] == sum(v.numel() * 4 for v in values.values())
    assert sorted(index["weight_map"]) == sorted(values)
    assert index["weight_map"]["w0"] == "model-00001-of-00004.safetensors"
    stored = _stored(tmp_path)
    assert stored.keys() == values.keys() and all(torch.equal(stored[k], values[k]) for k in values)


def test_a_produced_tensor_unlike_its_plan_is_refused(tmp_path):
    tensors = [PlannedTensor("w", (2, 2), torch.float32, lambda: torch.zeros(3))]
    with pytest.raises(DsftError, match=r"w came out \(3,\) torch.float32, planned \(2, 2\)"):
        write_shards(tensors, tmp_path, 100)


@pytest.mark.parametrize(("text", "expected"), [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1GiB", 2**30),
                                                 ("1.5 kb", 1500), ("123", 123)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["2XB", "-1GB", "0", "GB", ""])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(DsftError, match="--max-shard-size"):
        parse_size(text)


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors that torch ops create and that are still alive; peak_bytes is the most at once.
    Views and in-place results share memory already counted, and meta tensors have none."""

    def __init__(self):
        super().__init__()
        self.live_bytes = self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and not func.is_view and id(tensor) not in inputs and not tensor.is_meta:
                nbytes = tensor.untyped_storage().nbytes()
                self.live_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                weakref.finalize(tensor, self._freed, nbytes)
        return out

    def _freed(self, nbytes: int) -> None:
        self.live_bytes -= nbytes


def test_the_merge_holds_a_few_tensors_at_a_time_never_the_model(tokenizer, tmp_path):
    """Every tensor is rewritten (as bfloat16) into one output file, yet at most a few tensors are alive at once."""
    base = build_preset("tiny-deepseek-v3", tokenizer, seed=0, dtype=torch.float32)
    _save(base, MethodConfig(type="lora", lora=LoraConfig(r=4, alpha=8)), tmp_path)
    largest_fp32_bytes = max(t.numel() * 4 for t in _stored(tmp_path / "base").values())
    with _LiveBytes() as live:
        _, summary = _merge(tmp_path, max_shard_bytes=10**9, dtype=torch.bfloat16)
    assert summary["shards"] == 1 and summary["total_bytes"] > 10 * largest_fp32_bytes
    # Read, its float32 update, their sum and the cast: about three times the largest tensor, never the model.
    assert 0 < live.peak_bytes <= 3 * largest_fp32_bytes
