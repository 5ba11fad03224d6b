"""dsft bench --profile's reading of a profile: categories by operator or kernel name, shares, busy fraction and
the one-line verdict, on hand-made timings."""

import pytest

from dsft.bench.profile import category, summarize


@pytest.mark.parametrize("name, expected", [
    ("aten::mm", "matmul"), ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"), ("nvjet_tst_128x256_64x4", "matmul"),
    ("aten::_grouped_mm", "matmul"), ("pytorch_flash::flash_fwd_kernel", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("_ChunkedLinearCrossEntropy", "loss"), ("aten::_log_softmax", "loss"), ("ChunkedLogProbFunction", "loss"),
    ("Optimizer.step#AdamW.step", "optimizer"), ("ncclDevKernel_AllReduce_Sum_bf16", "communication"),
    ("Memcpy HtoD (Pageable -> Device)", "memory"), ("aten::fill_", "memory"),
    ("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", "data"),
    ("void at::native::vectorized_elementwise_kernel<4, ...>", "other"), ("_rms_norm_forward_kernel", "other"),
])
def test_names_fall_in_their_category(name, expected):
    assert category(name) == expected


def test_a_gpu_that_waits_on_the_host_is_read_as_host_bound():
    summary = summarize({"nvjet_tst_gemm": 300_000.0, "flash_fwd_kernel": 100_000.0}, wall_s=1.0, device="cuda")
    assert summary["busy_fraction"] == pytest.approx(0.4)
    assert summary["categories"] == {"matmul": pytest.approx(0.75), "attention": pytest.approx(0.25)}
    assert summary["limited_by"].startswith("the host: the GPU ran kernels 40% of the step time")


def test_a_busy_gpu_is_read_by_its_largest_category_and_lists_the_top_kernels():
    times = {"nvjet_tst_gemm": 500_000.0, "flash_fwd_kernel": 300_000.0, "elementwise_kernel": 100_000.0}
    summary = summarize(times, wall_s=1.0, device="cuda")
    assert summary["limited_by"] == "matmul: 56% of the GPU kernel time"
    assert [(top["name"], top["ms"]) for top in summary["top"]] == [
        ("nvjet_tst_gemm", 500.0), ("flash_fwd_kernel", 300.0), ("elementwise_kernel", 100.0)]
    assert sum(summary["categories"].values()) == pytest.approx(1.0)
    cpu = summarize({"aten::mm": 3.0, "aten::mul": 1.0}, wall_s=1.0, device="cpu")
    assert cpu["busy_fraction"] is None and cpu["limited_by"].startswith("matmul: 75% of the operator time")
