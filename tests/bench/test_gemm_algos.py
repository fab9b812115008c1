"""bench.gemm_algos's shapes and its command line (the cuBLASLt calls themselves need a GPU)."""

import pytest

from bench import gemm_algos


def test_gemm_algos_times_the_single_blocks_mlp_output_as_the_worker_accumulates_it() -> None:
    ops = {shape.name: shape.op for shape in gemm_algos.worker_shapes(1)}
    assert ops["single out, mlp part"] == "accumulate"
    assert ops["single out, attention part"] == "mm"
    assert ops["single mlp in (GELU)"] == "gelu"
    assert set(ops.values()) <= set(gemm_algos.EPILOGUE)


def test_gemm_algos_halves_the_tokens_under_ulysses_2() -> None:
    one, two = gemm_algos.worker_shapes(1), gemm_algos.worker_shapes(2)
    assert [shape.tokens // 2 for shape in one] == [shape.tokens for shape in two]


def test_gemm_algos_refuses_to_run_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        gemm_algos.main([])
    assert stopped.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
