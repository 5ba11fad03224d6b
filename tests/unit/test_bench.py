"""dsft bench's arithmetic and judgement: FLOPs per token of the published shapes, the correctness gate, token counting."""

import json
from pathlib import Path

import pytest
import torch

from dsft.bench.measure import gate, matmul_params, measured_steps, mfu, sample_flops, sample_lengths
from dsft.bench.run import run_bench
from dsft.bench.suites import PUBLISHED_SHAPES, suite_setups, synthetic_samples
from dsft.models.shapes import shape_config
from dsft.errors import DsftError

SHARED_SHAPES = Path(__file__).parents[3] / "shared" / "arch_shapes.json"


def test_matmul_params_of_published_shapes():
    # R1-Distill-Qwen-1.5B per layer: q and o 1536 x 12 x 128 each, k and v 1536 x 2 x 128 each, MLP 3 x 1536 x 8960;
    # 28 layers plus the lm_head 151936 x 1536 (the embedding lookup is no matmul).
    qwen = PUBLISHED_SHAPES["deepseek-r1-distill-qwen-1.5b"]
    assert matmul_params(qwen) == 28 * (2 * 2_359_296 + 2 * 393_216 + 41_287_680) + 233_373_696 == 1_543_569_408
    # DeepSeek-V2-Lite, active per token: MLA attention (q 2048 x 16 x 192, kv_a 2048 x 576, kv_b 512 x 16 x 256,
    # o 16 x 128 x 2048) in 27 layers, one dense MLP 3 x 2048 x 10944, 26 MoE layers with a router 2048 x 64 and
    # 2 shared + 6 routed experts of 3 x 2048 x 1408, and the lm_head 102400 x 2048.
    attention = 6_291_456 + 1_179_648 + 2_097_152 + 4_194_304
    moe_layer = 131_072 + 8 * 8_650_752
    v2_lite = PUBLISHED_SHAPES["deepseek-v2-lite"]
    assert matmul_params(v2_lite) == 27 * attention + 67_239_936 + 26 * moe_layer + 209_715_200 == 2_451_308_544


def test_matmul_params_of_the_sparse_attention_shapes():
    # DeepSeek-V3.2 is V3 plus, in each of 61 layers, the indexer's wq_b 1536 x 64 x 128, wk 7168 x 128 and
    # weights_proj 7168 x 64.
    v3, v32 = matmul_params(PUBLISHED_SHAPES["deepseek-v3"]), matmul_params(PUBLISHED_SHAPES["deepseek-v3.2"])
    assert v3 == 36_624_596_992  # with the 0.93 B embedding: the 37 B active parameters V3 publishes
    assert v32 - v3 == 61 * (1536 * 64 * 128 + 7168 * 128 + 7168 * 64) == 851_509_248
    # DeepSeek-V4-Flash, per layer: q_a 4096 x 1024, q_b 1024 x 64 x 512, kv 4096 x 512, the grouped o_a 8 groups of
    # 4096 x 1024, o_b 8192 x 4096; two hyper-connection mappings 16384 x 24; a router 4096 x 256, 6 routed and 1
    # shared expert of 3 x 4096 x 2048. Compressors: kv and gate 4096 x 512 each where heavily compressed (ratio
    # 128), 4096 x 1024 each plus the indexer's (kv and gate 4096 x 256, q_b 1024 x 64 x 128, weights 4096 x 64)
    # where compressed sparse (ratio 4). The lm_head 129280 x 4096 and the head's mapping 16384 x 4.
    v4 = PUBLISHED_SHAPES["deepseek-v4-flash"]
    kinds = shape_config(v4).layer_types
    heavy, sparse = kinds.count("heavily_compressed_attention"), kinds.count("compressed_sparse_attention")
    assert (heavy, sparse) == (23, 20)
    attention = 4096 * 1024 + 1024 * 64 * 512 + 4096 * 512 + 8 * 4096 * 1024 + 8192 * 4096
    layer = attention + 2 * 16384 * 24 + 4096 * 256 + 7 * 3 * 4096 * 2048
    compressors = heavy * 2 * 4096 * 512 + sparse * (2 * 4096 * 1024 + 2 * 4096 * 256 + 1024 * 64 * 128 + 4096 * 64)
    expected = 43 * layer + compressors + 129280 * 4096 + 16384 * 4
    assert matmul_params(v4) == expected == 13_261_668_352  # V4-Flash publishes 13 B active of 284 B


def test_the_new_shapes_are_the_configs_documented_defaults():
    from transformers import DeepseekV4Config, DeepseekV32Config

    for name, config in (("deepseek-v3.2", DeepseekV32Config()), ("deepseek-v4-flash", DeepseekV4Config())):
        shape = PUBLISHED_SHAPES[name]
        assert {key: getattr(config, key) for key in shape if key != "architecture"} == \
            {key: value for key, value in shape.items() if key != "architecture"}, name


def test_flops_per_sample_lora_and_full():
    qwen = PUBLISHED_SHAPES["deepseek-r1-distill-qwen-1.5b"]
    attention_per_token = 6 * 28 * 12 * (128 + 128) * 1000  # 6 L H (d_qk + d_v) s, s = 1000 tokens
    assert attention_per_token == 516_096_000
    assert sample_flops(qwen, "lora", 1000) == 1000 * (4 * 1_543_569_408 + attention_per_token) == 6_690_373_632_000
    assert sample_flops(qwen, "full", 1000) == 1000 * (6 * 1_543_569_408 + attention_per_token) == 9_777_512_448_000
    # MLA: d_qk = 128 + 64 (nope + rope), d_v = 128.
    v2_lite = PUBLISHED_SHAPES["deepseek-v2-lite"]
    assert sample_flops(v2_lite, "lora", 2048) == 2048 * (4 * 2_451_308_544 + 6 * 27 * 16 * 320 * 2048) == 23_560_043_102_208
    assert mfu(400e12) == {"mfu_800": 0.5, "mfu_989": 400 / 989}


def test_gate_refuses_a_two_percent_loss_difference_and_a_zero_gradient():
    assert gate([2.0, 2.0], [1.0, 0.5], None) is None
    assert gate([2.01, 2.01], [1.0, 0.5], reference_loss=2.0) is None  # 0.5%
    assert "differs from B0's 2.0000 by 2.00%" in gate([2.04, 2.04], [1.0, 0.5], reference_loss=2.0)
    assert "gradient norm 0.0 at measured step 2" in gate([2.0, 2.0], [1.0, 0.0], reference_loss=2.0)
    assert "non-finite" in gate([2.0, float("nan")], [1.0, 1.0], None)
    assert "gradient norm nan" in gate([2.0], [float("nan")], None)


def test_sample_lengths_of_padded_and_padding_free_batches():
    assert sample_lengths({"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}) == [3, 2]
    assert sample_lengths({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}) == [3, 2, 1]


def test_synthetic_samples_cover_every_recipe_and_mask_prompts():
    for setup in suite_setups("h100"):
        samples = synthetic_samples(setup)
        lengths = [len(s["input_ids"]) for s in samples]
        assert len(samples) >= 4 * setup.steps and sum(lengths) >= setup.steps * setup.max_tokens
        assert max(lengths) <= setup.max_tokens and min(min(s["input_ids"]) for s in samples) >= 1  # 0 is padding
        assert all(s["labels"][0] == -100 for s in samples)  # packed rows never score a sample's first token
        assert 0.7 * setup.mean_tokens < sum(lengths) / len(lengths) < 1.3 * setup.mean_tokens  # log-normal, clipped


@pytest.mark.skipif(not SHARED_SHAPES.is_file(), reason="../shared/arch_shapes.json is beside the checkout only")
def test_published_shapes_match_the_shared_file():
    shared = json.loads(SHARED_SHAPES.read_text(encoding="utf-8"))
    assert {"deepseek-v2-lite", "deepseek-v3"} <= shared.keys() & PUBLISHED_SHAPES.keys()
    for name, shape in PUBLISHED_SHAPES.items():
        if name not in shared:  # V3.2 and V4: transformers' documented defaults (the test above)
            continue
        assert shape == {k: v for k, v in shared[name].items() if not k.startswith("_")}, name


def test_unknown_suite_or_setup_and_longest_without_cuda_are_user_errors(tmp_path):
    with pytest.raises(DsftError, match="unknown suite 'huge'"):
        run_bench("huge", tmp_path / "x.json")
    with pytest.raises(DsftError, match=r"unknown \['z'\]"):
        run_bench("tiny", tmp_path / "x.json", setups=["z"])
    if not torch.cuda.is_available():
        with pytest.raises(DsftError, match="needs a CUDA GPU"):
            run_bench("tiny", tmp_path / "x.json", setups=["a"], longest=True)


def test_a_bench_cut_short_leaves_the_recipes_it_finished_on_disk(tmp_path, monkeypatch):
    from dsft.bench import run as bench_run

    def one_recipe(recipe, setup, work_dir, longest, profile):
        if recipe == "B1":
            raise KeyboardInterrupt  # what a time limit's signal does in the middle of a recipe
        return {"error": f"{recipe} broke"}

    monkeypatch.setattr(bench_run, "_run_one", one_recipe)
    out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        run_bench("tiny", out, setups=["a"])
    rows = json.loads(out.read_text(encoding="utf-8"))["setups"][0]["recipes"]
    assert {name: (row["status"], row["reason"]) for name, row in rows.items()} == {
        "B0": ("failed", "B0 broke"), "B1": ("not run", "the bench stopped before this recipe"),
        "dsft": ("not run", "the bench stopped before this recipe")}


def test_larger_rows_make_b0_accumulate_and_the_samples_cover_every_recipe():
    import dataclasses

    setup = dataclasses.replace(suite_setups("h100")[0], row_tokens=16384)
    assert (setup.packed_row_tokens, setup.b0_accumulation) == (16384, 8)
    assert (suite_setups("h100")[0].packed_row_tokens, suite_setups("h100")[0].b0_accumulation) == (2048, 1)
    lengths = [len(s["input_ids"]) for s in synthetic_samples(setup)]
    assert len(lengths) >= 4 * 8 * setup.steps and sum(lengths) >= setup.steps * 16384
    with pytest.raises(DsftError, match=r"--row-tokens 1024: a row must hold a-qwen-1.5b-lora's longest sample, 2048"):
        run_bench("h100", setups=["a"], row_tokens=1024)


def test_measured_steps_count_every_accumulated_batch_of_a_step():
    # 3 steps of 2 accumulated batches each (and one batch the loader collated ahead); warmup 1.
    batches = [[5], [6], [7, 8], [9], [10], [11], [99]]
    logs = [{"step": step, "loss": 2.0 + step, "grad_norm": 1.0} for step in (1, 2, 3)]
    measured = measured_steps(logs, [10.0, 11.0, 13.0], batches, 1, PUBLISHED_SHAPES["deepseek-r1-distill-qwen-1.5b"],
                              "lora", batches_per_step=2)
    assert measured.real_tokens == 7 + 8 + 9 + 10 + 11 and measured.seconds == 3.0
    assert measured.losses == [4.0, 5.0] and measured.tokens_per_s == 45 / 3
