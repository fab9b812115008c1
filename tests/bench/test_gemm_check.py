"""bench.gemm_check's table of shapes and its BLAS settings (the timing itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from bench import gemm_check


def reduction() -> tuple[bool, bool]:
    return tuple(torch._C._get_cublas_allow_bf16_reduced_precision_reduction())  # type: ignore[return-value]


def test_blas_setting_applies_inside_the_block_and_restores_after_an_error() -> None:
    before = (torch.backends.cuda.preferred_blas_library(), reduction())
    with pytest.raises(ValueError), gemm_check.blas_setting("cublas", (False, True)):
        assert reduction() == (False, True)
        raise ValueError
    assert (torch.backends.cuda.preferred_blas_library(), reduction()) == before


def test_shapes_cover_a_steps_gemms_and_halve_the_sequence_under_ulysses_2() -> None:
    one, two = gemm_check.shapes(1), gemm_check.shapes(2)
    # 19 double blocks: q/k/v and out for the image, q/k/v for the text, two MLPs; 38 single blocks
    assert sum(shape.calls for shape in one) == 19 * (3 + 1 + 2 + 3 + 2) + 38 * (3 + 1 + 2)
    assert [s.tokens for s in two] == [s.tokens // 2 for s in one]
    flops = sum(2 * s.tokens * s.inputs * s.outputs * s.calls for s in one)
    assert 50e12 < flops < 60e12  # FLUX.1-dev's linear layers at 1024x1024, one step, without the adaLN


def test_gemm_check_accepts_its_default_settings_whose_names_hold_commas(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        gemm_check.main([])  # on this CPU it stops at the GPU check, past the settings
    error = capsys.readouterr().err
    assert "needs a CUDA GPU" in error and "unknown settings" not in error
    with pytest.raises(SystemExit):
        gemm_check.main(["--settings", "cublaslt;nonsense"])
    assert "unknown settings ['nonsense']" in capsys.readouterr().err
