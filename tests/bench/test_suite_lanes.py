"""The device suite's lanes: bash keeps the last of two functions with one name, so a lane written twice
runs something other than what its header says."""

import re
from collections import Counter
from pathlib import Path

SUITE = Path(__file__).resolve().parents[2] / "bench" / "suite.sh"


def lane_functions() -> list[str]:
    return re.findall(r"^lane_([a-z0-9_]+)\(\)", SUITE.read_text(), flags=re.MULTILINE)


def test_each_lane_is_defined_once() -> None:
    twice = [name for name, count in Counter(lane_functions()).items() if count > 1]
    assert twice == []


def test_each_lane_is_described_in_the_header() -> None:
    header = SUITE.read_text().split("\nset ", 1)[0]
    described = set(re.findall(r"^#   ([a-z0-9_]+)\s", header, flags=re.MULTILINE))
    assert set(lane_functions()) - described == set()
