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


def test_rope_table_interleaves_each_pairs_cos_and_sin() -> None:
    import torch

    from worker.optimizations.quack_qk import rope_table

    operands = quack_check.rope_operands((3, 5), torch.device("cpu"))
    table = rope_table(operands.cos, operands.sin)
    assert table.shape == (8, 128)
    assert torch.equal(table[:, 0::2], operands.cos[:, 0::2])
    assert torch.equal(table[:, 1::2], operands.sin[:, 1::2])
    assert torch.equal(operands.cos[:, 0::2], operands.cos[:, 1::2])  # one angle per pair, as FLUX's RoPE


def test_rope_check_compares_the_workers_kernel_against_float32_truth() -> None:
    import torch

    for rows in ((4, 12), (16,)):  # a double block's text and image rows; a single block's
        operands = quack_check.rope_operands(rows, torch.device("cpu"))
        worker, truth = operands.worker()(), operands.truth()
        assert worker.shape == truth.shape == (sum(rows), 3072)
        assert (worker.float() - truth).abs().max().item() < 0.1
