"""Kernel kinds of the benchmarks' CUDA profiles."""

from __future__ import annotations

import pytest

from bench.profiling import Span, following, idle_gaps, kernel_kind


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("ncclDevKernel_AllToAll_RING_LL", "collectives (NCCL)"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_NNT", "GEMM"),
        ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128", "GEMM"),
        ("triton_red_fused_native_layer_norm_0", "other (elementwise, norms, copies)"),
        (
            "triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention__to_copy_add",
            "other (elementwise, norms, copies)",
        ),
        (
            "triton_poi_fused__scaled_mm__to_copy_cat_clamp_div_gelu_permute",
            "other (elementwise, norms, copies)",
        ),
        ("triton_tem_fused_mm_0", "GEMM"),
    ],
)
def test_kernel_names_map_to_their_kind(name: str, kind: str) -> None:
    assert kernel_kind(name) == kind


def test_c10d_annotations_of_a_collective_are_not_kernels() -> None:
    assert kernel_kind("nccl:all_to_all") is None
    assert kernel_kind("nccl:all_gather_into_tensor_coalesced") is None


def test_idle_gaps_are_the_intervals_no_kernel_covers_with_what_the_host_was_doing() -> None:
    device = [
        Span(0, 50, "gemm_a"),
        Span(40, 100, "attention"),  # overlaps the first: one busy interval 0-100
        Span(105, 110, "triton_poi_norm"),  # a 5 us bubble
        Span(410, 450, "gemm_b"),  # a 300 us gap
        Span(470, 500, "gemm_c"),  # a 20 us gap
    ]
    host = [
        Span(0, 1000, "generate"),
        Span(100, 420, "aten::item"),
        Span(120, 400, "cudaStreamSynchronize"),
        Span(440, 445, "cudaLaunchKernel"),
    ]
    idle = idle_gaps(device, host)
    assert idle["busy_s"] == pytest.approx(175e-6)
    assert idle["idle_s"] == pytest.approx(325e-6)
    assert idle["by_length"] == {
        "under 10 us": {"gaps": 1, "s": pytest.approx(5e-6)},
        "10-100 us": {"gaps": 1, "s": pytest.approx(20e-6)},
        "over 100 us": {"gaps": 1, "s": pytest.approx(300e-6)},
    }
    first = idle["largest"][0]
    assert first["us"] == 300 and first["at_us"] == 110
    assert (first["after"], first["before"]) == ("triton_poi_norm", "gemm_b")
    assert first["host"] == ["cudaStreamSynchronize", "aten::item", "generate"]  # innermost first
    assert [gap["us"] for gap in idle["largest"]] == [300, 20, 5]
    assert idle["by_neighbours"] == [  # gaps of 10 us or more, by the kernels on either side
        {"after": "triton_poi_norm", "before": "gemm_b", "gaps": 1, "s": pytest.approx(300e-6)},
        {"after": "gemm_b", "before": "gemm_c", "gaps": 1, "s": pytest.approx(20e-6)},
    ]


def test_gaps_with_the_same_neighbours_add_up() -> None:
    device = [Span(0, 10, "gemm"), Span(30, 40, "norm"), Span(55, 65, "gemm"), Span(85, 95, "norm")]
    assert idle_gaps(device, [])["by_neighbours"] == [
        {"after": "gemm", "before": "norm", "gaps": 2, "s": pytest.approx(40e-6)},
        {"after": "norm", "before": "gemm", "gaps": 1, "s": pytest.approx(15e-6)},
    ]


def test_idle_gaps_of_no_kernels_are_empty() -> None:
    assert idle_gaps([], [Span(0, 10, "generate")])["largest"] == []


def test_the_kernels_after_memsets_are_tallied_most_frequent_first() -> None:
    device = [
        Span(0, 1, "Memset (Device)"),
        Span(2, 5, "gemm"),
        Span(6, 7, "Memset (Device)"),
        Span(7, 8, "Memset (Device)"),  # consecutive memsets count once, for the kernel after them
        Span(9, 12, "gemm"),
        Span(13, 14, "Memset (Device)"),
        Span(15, 20, "attention"),
        Span(21, 22, "norm"),
    ]
    assert following(device, "Memset", 5) == [{"name": "gemm", "calls": 2}, {"name": "attention", "calls": 1}]
