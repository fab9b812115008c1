"""The end-to-end driver's pieces that run nowhere else before the device: .deb unpacking and the report."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from bench.e2e import redis_debs
from bench.e2e.redis_debs import ar_members, extract_deb, install_redis
from bench.e2e.report import OVERHEAD_TARGET_S, THROUGHPUT_TARGETS, format_headline, headline
from bench.e2e.run import image_step_s
from bench.e2e.scenarios import gpu_plan, smoke_plan


def _tar_xz(files: dict[str, bytes], links: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            archive.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out += header.encode("ascii") + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def test_a_deb_unpacks_like_dpkg_x(tmp_path: Path) -> None:
    data = _tar_xz(
        {"./usr/bin/redis-check-rdb": b"#!binary", "./usr/lib/x86_64-linux-gnu/liblzf.so.1.5": b"odd"},
        {"./usr/bin/redis-server": "redis-check-rdb"},
    )
    deb = tmp_path / "redis-tools_7.0.15_amd64.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"c", "data.tar.xz": data}))
    assert list(ar_members(deb.read_bytes())) == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    extract_deb(deb, tmp_path / "prefix")
    server = tmp_path / "prefix" / "usr" / "bin" / "redis-server"
    assert server.is_symlink() and server.read_bytes() == b"#!binary"
    assert (tmp_path / "prefix/usr/lib/x86_64-linux-gnu/liblzf.so.1.5").read_bytes() == b"odd"
    with pytest.raises(ValueError, match="not an ar archive"):
        ar_members(b"PK\x03\x04")


def test_a_system_library_the_machine_lacks_is_taken_from_the_carried_debs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debs = tmp_path / "debs"
    debs.mkdir()
    tools = _tar_xz({"./usr/bin/redis-check-rdb": b"bin"}, {"./usr/bin/redis-server": "redis-check-rdb"})
    ssl = _tar_xz({"./usr/lib/x86_64-linux-gnu/libssl.so.3": b"ssl"}, {})
    (debs / "redis-tools_7.0.15_amd64.deb").write_bytes(_ar({"data.tar.xz": tools}))
    (debs / "libssl3_3.0.22_amd64.deb").write_bytes(_ar({"data.tar.xz": ssl}))

    def missing(binary: Path, library_path: str) -> list[str]:  # ldd's answer on a machine without libssl3
        return [] if "shim" in library_path else ["libssl.so.3"]

    monkeypatch.setattr(redis_debs, "_missing_libraries", missing)
    server = install_redis(debs, tmp_path / "prefix")
    assert server.substituted == ["libssl.so.3"]
    shim = tmp_path / "prefix" / "shim"
    assert server.library_path.split(":") == [
        str(tmp_path / "prefix/redis/usr/lib/x86_64-linux-gnu"),
        str(shim),
    ]
    assert (shim / "libssl.so.3").read_bytes() == b"ssl"
    assert not (tmp_path / "prefix" / "redis" / "usr" / "lib" / "x86_64-linux-gnu" / "libssl.so.3").exists()


def _request(latency: float, inference: float, queue: float = 0.01, upload: float = 0.02) -> dict[str, Any]:
    return {
        "success": True,
        "latency_s": latency,
        "inference_s": inference,
        "queue_s": queue,
        "upload_s": upload,
    }


def _document(
    requests: list[dict[str, Any]], throughput: float = 0.0, inference: float = 4.0
) -> dict[str, Any]:
    ok = sum(1 for request in requests if request["success"])
    summary = {
        "request_throughput": throughput,
        "inference_mean_s": inference,
        "completed": ok,
        "failed": len(requests) - ok,
        "duration_s": 80.0,
    }
    return {"summary": summary, "requests": requests}


def test_stack_overhead_is_latency_less_engine_time_split_into_its_parts() -> None:
    jpeg = _document([_request(4.10, 4.00), _request(4.30, 4.00), _request(4.12, 4.00)])
    png = _document([_request(4.50, 4.00, upload=0.32), _request(4.52, 4.00, upload=0.34)])
    failed = {"success": False, "latency_s": 9.0, "inference_s": None}
    jpeg["requests"].append(failed)
    result = headline({"c1-jpeg": jpeg, "c1-png": png}, encode=None, stock=None)
    c1 = result["c1_jpeg"]
    assert c1["requests"] == 3
    assert c1["overhead_s"]["median"] == pytest.approx(0.12)
    assert c1["overhead_s"]["max"] == pytest.approx(0.30)
    assert c1["rest_s"]["median"] == pytest.approx(0.12 - 0.01 - 0.02)
    assert c1["met"] is True and c1["target_overhead_s"] == OVERHEAD_TARGET_S
    slow = _document([_request(4.20, 4.00), _request(4.16, 4.00)])
    assert headline({"c1-jpeg": slow}, encode=None, stock=None)["c1_jpeg"]["met"] is False
    assert result["png_minus_jpeg_upload_s"] == pytest.approx(0.33 - 0.02)
    assert "c20_28steps" not in result  # scenarios that did not run are left out


def test_throughput_is_judged_against_the_issue_and_the_engine_bound() -> None:
    scenarios = {
        "c20-28steps": _document([_request(40, 3.9)] * 20, throughput=0.25, inference=3.9),
        "c20-50steps": _document([_request(70, 6.0)] * 20, throughput=0.161, inference=6.0),
        "c1-jpeg": _document([_request(4.0, 3.9)]),
    }
    result = headline(scenarios, encode=None, stock={"compiled_s": [3.95, 3.93]})
    assert result["c20_28steps"]["met"] is False and result["c20_28steps"]["target_throughput"] == 0.28
    assert result["c20_28steps"]["engine_bound_throughput"] == pytest.approx(1 / 3.9, abs=1e-4)
    assert result["c20_28steps"]["stack_efficiency"] == pytest.approx(0.25 * 3.9, abs=1e-3)
    assert result["c20_50steps"]["met"] is True
    assert result["engine_vs_stock"]["stock_over_engine"] == pytest.approx(3.93 / 3.9, abs=1e-3)
    table = format_headline(result)
    assert "0.2500 req/s" in table and "NOT met" in table and "stock/engine" in table


def test_an_fp8_run_is_judged_against_the_fp8_targets() -> None:
    scenarios = {
        "c20-28steps": _document([_request(40, 3.0)] * 20, throughput=0.33, inference=3.0),
        "c20-50steps": _document([_request(70, 5.2)] * 20, throughput=0.19, inference=5.2),
    }
    result = headline(scenarios, encode=None, stock=None, fp8=True)
    assert result["c20_50steps"]["target_throughput"] == 0.22 and result["c20_50steps"]["met"] is False
    assert result["c20_28steps"]["target_throughput"] is None and result["c20_28steps"]["met"] is None
    assert "no target" in format_headline(result)


def test_a_batched_run_counts_each_jobs_share_of_its_batchs_engine_time() -> None:
    batched = [{**_request(12.0, 8.0), "batch_size": 4}] * 16 + [{**_request(5.0, 3.9), "batch_size": 1}] * 4
    result = headline({"c20-28steps": _document(batched, throughput=0.4, inference=7.18)}, None, None)
    row = result["c20_28steps"]
    assert row["engine_bound_throughput"] == pytest.approx(20 / (16 * 2.0 + 4 * 3.9), abs=1e-4)
    assert row["mean_batch_size"] == pytest.approx(3.4)
    assert "mean batch 3.4" in format_headline(result)


def test_the_gpu_plan_measures_what_the_issue_asks() -> None:
    plan = gpu_plan()
    by_name = {scenario.name: scenario for scenario in plan.scenarios}
    assert plan.size == 1024 and plan.model["defaults"]["width"] == 1024
    assert (by_name["c1-jpeg"].concurrency, by_name["c1-jpeg"].output_format) == (1, "jpeg")
    assert by_name["c1-png"].output_format == "png"
    for name in THROUGHPUT_TARGETS:  # the report looks the throughput scenarios up by these names
        assert by_name[name].concurrency == 20 and by_name[name].prompts == 20
    assert (by_name["c20-28steps"].steps, by_name["c20-50steps"].steps) == (28, 50)
    assert [s.name for s in smoke_plan().scenarios] == [s.name for s in plan.scenarios]


def test_the_budget_sizes_later_scenarios_by_each_images_share_of_a_batched_step() -> None:
    batched = [{**_request(12.0, 8.0), "batch_size": 4}] * 20  # 8 s a batch of four at 28 steps
    assert image_step_s(_document(batched, inference=8.0), steps=28) == pytest.approx(2.0 / 28)
    assert image_step_s(_document([_request(4.0, 3.9)] * 3), steps=28) == pytest.approx(3.9 / 28)
    assert (
        image_step_s(
            _document([{"success": False, "latency_s": 9.0, "inference_s": None}], inference=None), 28
        )
        is None
    )
