"""A Python here that holds what the GPU device holds, to check the carried wheels before a device call.

    .venv/bin/python -m bench.e2e.devlike /tmp/devlike
    /tmp/devlike/venv/bin/python -m bench.e2e --smoke --wheels /tmp/devlike/wheels --site /tmp/devlike/site \\
        --out /tmp/devlike/out

The device has torch, transformers, tokenizers, Pillow and requests (with what they require) and none of
the service.
This builds a fresh virtual environment that sees only those distributions of this checkout's .venv,
and downloads this machine's builds of the very versions carried in .whl/ and .whl-serve/ (the device's
are for Python 3.12). A smoke run on it then fails on any import the carried set does not cover.
Run it with the .venv's Python (it reads the .venv's installed metadata).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
import venv
from pathlib import Path

from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[2]
# Pillow and requests: diffusers imports both, and it ran on the device with only .whl/ carried.
DEVICE_HAS = ("torch", "transformers", "tokenizers", "pillow", "requests")
CARRIED = (REPO_ROOT / ".whl", REPO_ROOT / ".whl-serve")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_wheels() -> dict[str, str]:
    """Name -> version of every carried wheel (from the file names)."""
    found = {}
    for folder in CARRIED:
        for wheel in folder.glob("*.whl"):
            name, version = wheel.name.split("-")[:2]
            found[normalize(name)] = version
    return found


def closure(roots: tuple[str, ...]) -> set[str]:
    """The installed distributions ``roots`` require, recursively (markers evaluated, no extras)."""
    seen: set[str] = set()
    pending = [normalize(root) for root in roots]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.distribution(name).requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(normalize(requirement.name))
    return seen


def link_distribution(name: str, target: Path) -> None:
    """Symlink the top-level files and folders of an installed distribution into ``target``."""
    distribution = metadata.distribution(name)
    site = Path(str(distribution.locate_file("")))
    tops = {Path(str(path)).parts[0] for path in distribution.files or [] if not str(path).startswith("..")}
    for top in tops:
        link = target / top
        if not link.exists() and (site / top).exists():
            link.symlink_to(site / top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    root = args.directory.resolve()
    carried = carried_wheels()
    base = sorted(closure(DEVICE_HAS) - set(carried))
    (root / "base").mkdir(parents=True, exist_ok=True)
    for name in base:
        link_distribution(name, root / "base")
    venv.EnvBuilder(with_pip=True, clear=True).create(root / "venv")
    pth = next((root / "venv" / "lib").glob("python3*/site-packages")) / "device-base.pth"
    pth.write_text(f"{root / 'base'}\n", encoding="utf-8")
    pins = [f"{name}=={version}" for name, version in sorted(carried.items())]
    download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*download, "-d", str(root / "wheels"), *pins], check=True)
    print(f"device-like base: {', '.join(base)}")
    print(f"python: {root / 'venv' / 'bin' / 'python'}; wheels: {root / 'wheels'} ({len(pins)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
