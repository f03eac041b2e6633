#!/usr/bin/env bash
# Stages the comparison packages that the GPU machines' image lacks (bitsandbytes, torchao: test
# and benchmark dependencies, never runtime ones) as a plain folder, .gpu_deps/site-packages
# (git-ignored), small enough to travel with the checkout to a machine with no network.
# gpu_check.sh puts the folder on PYTHONPATH when it is there.
#
#   bash bench/stage_gpu_deps.sh      # here, where pip reaches a package index; then carry .gpu_deps
#
# The versions are the ones the tests and benchmarks were written against. Of bitsandbytes' native
# libraries only the CPU one and the CUDA 13.0 one (the GPU image's torch) are kept: all of them
# together are 40 MB.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
DEST="$REPO/.gpu_deps/site-packages"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --only-binary :all: -d "$TMP/wheels" bitsandbytes==0.50.2 torchao==0.18.0
mkdir -p "$TMP/site-packages"
for wheel in "$TMP"/wheels/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$TMP/site-packages"; done
# torchao's wheel also installs its test suite as a top-level package `test`, which on PYTHONPATH
# would stand in for the standard library's
rm -rf "$TMP/site-packages/test"
find "$TMP/site-packages/bitsandbytes" -name 'libbitsandbytes_*' \
  ! -name 'libbitsandbytes_cpu.so' ! -name 'libbitsandbytes_cuda130.so' -delete
rm -rf "$DEST" && mkdir -p "$(dirname "$DEST")" && mv "$TMP/site-packages" "$DEST"
echo "staged in $DEST ($(du -sh "$DEST" | cut -f1)): $(ls "$DEST" | grep -c dist-info) packages"
ls "$DEST" | grep dist-info
