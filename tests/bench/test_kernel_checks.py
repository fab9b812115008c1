"""What the GPU kernel checks (bench.qk_rope_check, bench.fp8_mlp_check) hand the device suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.attention_probe import report


def test_report_prints_the_result_line_and_writes_the_json_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = {"device": "cpu", "single": {"bytes_differing": 0}}
    out = tmp_path / "check.json"
    report(result, str(out))
    line = capsys.readouterr().out.strip()
    assert line.startswith("RESULT ") and json.loads(line.removeprefix("RESULT ")) == result
    assert json.loads(out.read_text()) == result
    report(result, None)  # no file asked for: the line only
    assert capsys.readouterr().out.startswith("RESULT ")
