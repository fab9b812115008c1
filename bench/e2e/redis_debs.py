"""Debian's redis-server from carried .deb files, unpacked into a private prefix (never ``/``).

A .deb is an ``ar`` archive whose ``data.tar.*`` member holds the files; reading it here needs neither
dpkg nor root. The binary's own libraries (libjemalloc, liblzf) come from the prefix through
``LD_LIBRARY_PATH``; the system libraries it links (libssl, libatomic, libsystemd) come from the
machine, and only where ``ldd`` finds one missing is the carried Debian copy linked in its place.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

AR_MAGIC = b"!<arch>\n"
AR_HEADER_BYTES = 60
# Packages unpacked only as stand-ins for system libraries the machine lacks.
FALLBACK_PACKAGES = ("libssl3", "libatomic1", "libsystemd0")
LIBRARY_DIR = Path("usr/lib/x86_64-linux-gnu")


def ar_members(data: bytes) -> dict[str, bytes]:
    """The members of an ``ar`` archive (the format of .deb files), by name."""
    if not data.startswith(AR_MAGIC):
        raise ValueError("not an ar archive (a .deb starts with !<arch>)")
    members, offset = {}, len(AR_MAGIC)
    while offset + AR_HEADER_BYTES <= len(data):
        header = data[offset : offset + AR_HEADER_BYTES]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = offset + AR_HEADER_BYTES
        members[name] = data[start : start + size]
        offset = start + size + (size % 2)  # members are padded to an even offset
    return members


def extract_deb(deb: Path, prefix: Path) -> None:
    """Unpack the files of ``deb`` under ``prefix`` (what ``dpkg -x deb prefix`` does)."""
    members = ar_members(deb.read_bytes())
    payload = next((blob for name, blob in members.items() if name.startswith("data.tar")), None)
    if payload is None:
        raise ValueError(f"{deb.name} has no data.tar member")
    prefix.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as archive:
        archive.extractall(prefix, filter="tar")


@dataclass
class RedisServer:
    """An unpacked redis-server and the environment it runs in."""

    binary: Path
    library_path: str
    substituted: list[str]

    def env(self) -> dict[str, str]:
        return {**os.environ, "LD_LIBRARY_PATH": self.library_path}

    def version(self) -> str:
        """``redis-server --version``; raises, with the loader's complaint, where the binary cannot run."""
        done = subprocess.run([str(self.binary), "--version"], env=self.env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the carried redis-server does not run here: {done.stderr.strip()[-1000:]}")
        return done.stdout.strip()


def _is_fallback(deb: Path) -> bool:
    return deb.name.split("_")[0] in FALLBACK_PACKAGES


def _missing_libraries(binary: Path, library_path: str) -> list[str]:
    """Shared libraries ``ldd`` cannot find for ``binary`` (sonames such as ``libssl.so.3``)."""
    try:
        done = subprocess.run(
            ["ldd", str(binary)],
            env={**os.environ, "LD_LIBRARY_PATH": library_path},
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:  # no ldd: the server's own start then says what is missing
        return []
    return [line.split()[0] for line in done.stdout.splitlines() if "not found" in line]


def install_redis(debs: Path, prefix: Path) -> RedisServer:
    """Unpack the carried redis-server; link carried stand-ins for the system libraries it cannot find."""
    packages = sorted(debs.glob("*.deb"))
    if not any(deb.name.startswith("redis-tools_") for deb in packages):
        raise SystemExit(f"no redis-tools .deb in {debs} (bench/e2e/fetch.sh downloads them)")
    for deb in packages:
        extract_deb(deb, prefix / ("fallback" if _is_fallback(deb) else "redis"))
    binary = prefix / "redis" / "usr" / "bin" / "redis-server"
    library_path = str(prefix / "redis" / LIBRARY_DIR)
    missing = _missing_libraries(binary, library_path)
    if missing:
        shim = prefix / "shim"
        shim.mkdir(exist_ok=True)
        for soname in missing:
            carried = prefix / "fallback" / LIBRARY_DIR / soname
            if not carried.exists():
                raise SystemExit(
                    f"redis-server needs {soname}: neither the machine nor the carried .debs have it"
                )
            (shim / soname).unlink(missing_ok=True)
            (shim / soname).symlink_to(carried)
        library_path += os.pathsep + str(shim)
        still = _missing_libraries(binary, library_path)
        if still:
            raise SystemExit(f"redis-server still cannot find {', '.join(still)}")
    return RedisServer(binary=binary, library_path=library_path, substituted=missing)


def redis_command(server: RedisServer, port: int, directory: Path, logfile: Path) -> list[str]:
    """The server as the deployments run it (deploy/ensure-redis.sh): append-only, never evicting."""
    return [
        str(server.binary),
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
        *("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
        *("--maxmemory-policy", "noeviction", "--logfile", str(logfile)),
    ]
