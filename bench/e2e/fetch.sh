#!/usr/bin/env bash
# Fetch what `python3 -m bench.e2e` needs on the GPU device into ignored folders of the checkout, to be
# carried with the call (docs/performance.md, "End-to-end serving on the GPU"):
#   .whl-serve/  the service's wheels for the device's Python 3.12 (bench/e2e/requirements-serve.txt)
#   .debs/       Debian's redis-server and its libraries, extracted there into a private prefix
#   .data/       the vbench prompts (../shared/data does not travel)
# Run from the repository root; needs pip and apt-get (Debian bookworm, like this project's machines).
set -euo pipefail
cd "$(dirname "$0")/../.."
for folder in /.whl-serve/ /.debs/ /.data/; do
  grep -qxF "$folder" .git/info/exclude || echo "$folder" >> .git/info/exclude
done

rm -rf .whl-serve && mkdir -p .whl-serve
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl-serve -r bench/e2e/requirements-serve.txt

# redis-server 7.0 and the two libraries Debian ships beside it; libssl3, libatomic1 and libsystemd0 are
# used on the device only where its own system lacks them (bench/e2e/redis_debs.py decides with ldd).
rm -rf .debs && mkdir -p .debs
(cd .debs && apt-get download redis-server redis-tools libjemalloc2 liblzf1 libssl3 libatomic1 libsystemd0)
for deb in .debs/*.deb; do  # plain names: "5%3a7.0.15-1~deb12u10" -> "7.0.15-1-deb12u10"
  clean=$(basename "$deb" | sed -e 's/[0-9]*%3a//' -e 's/[~+]/-/g')
  [ "$clean" = "$(basename "$deb")" ] || mv "$deb" ".debs/$clean"
done

mkdir -p .data && cp ../shared/data/vbench_all_dimension.txt .data/
du -sh .whl-serve .debs .data
