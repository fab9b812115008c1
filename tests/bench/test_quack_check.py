"""bench.quack_check's command line (quack and its GEMMs need a Hopper GPU and the CuTe DSL)."""

import pytest

from bench import quack_check


def test_quack_check_times_shapes_the_worker_runs() -> None:
    from bench.gemm_algos import worker_shapes

    assert set(quack_check.SHAPES) <= {shape.name for shape in worker_shapes(1)}


def test_quack_check_refuses_to_run_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        quack_check.main([])
    assert stopped.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
