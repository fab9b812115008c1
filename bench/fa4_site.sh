#!/usr/bin/env bash
# flash-attn-4 on the device, where no registry is reachable (docs/performance.md, lease 84).
#
#   bash bench/fa4_site.sh fetch    here: .fa4libs/cu13.tar.xz and .whl-fa4/ (Python 3.12 wheels)
#   bash bench/fa4_site.sh unpack   there: whatever of the two travelled, into /tmp/fa4site
#
# The CuTe DSL's CUDA 13 libraries (nvidia-cutlass-dsl-libs-cu13) are a 92 MB wheel; xz brings them to
# 64 MB, so with the working tree they fill one call's 64 MiB: one call carries .fa4libs and unpacks it,
# the next, on the same warm machine, carries .whl-fa4 (and the other wheels) and unpacks it beside them.
# bench/suite.sh puts /tmp/fa4site on PYTHONPATH when it is there.
set -eu
SITE=/tmp/fa4site
case "${1:?fetch or unpack}" in
fetch)
  pip_download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$@"
  }
  pip_download .whl-fa4 flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 \
    quack-kernels==0.6.5 cuda-bindings==13.5.0 cuda-pathfinder==1.9.1 einops==0.8.2
  tmp=$(mktemp -d)
  pip_download "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
  mkdir -p "$tmp/x" .fa4libs
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$tmp"/*.whl "$tmp/x"
  tar -C "$tmp/x" -cf - . | xz -T2 -9 >.fa4libs/cu13.tar.xz
  rm -rf "$tmp"
  ;;
unpack)
  mkdir -p "$SITE"
  if [ -f .fa4libs/cu13.tar.xz ]; then tar -xJf .fa4libs/cu13.tar.xz -C "$SITE"; fi
  for wheel in .whl-fa4/*.whl; do
    [ -f "$wheel" ] || continue
    python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheel" "$SITE"
  done
  ls "$SITE"
  ;;
esac
