"""Kernel kinds of the benchmarks' CUDA profiles."""

from __future__ import annotations

import pytest

from bench.profiling import kernel_kind


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
