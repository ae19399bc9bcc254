#!/usr/bin/env bash
# Builds .tl/tl.tar.xz (about 38 MB, under the device call's carry limit beside .whl): tilelang and the
# libraries it loads (apache-tvm-ffi, torch-c-dlpack-ext, z3-solver's library), for CPython 3.12 on x86-64
# Linux. bench/gpu_session.sh unpacks it into .tlsite and puts it on PYTHONPATH; flash-linear-attention then
# runs its gated delta rule backward on tilelang's kernel on Hopper GPUs (its Triton kernel there is wrong
# under Triton 3.4-3.7.0, and fla refuses it). Dropped to fit: z3's command-line binary, its duplicate library
# (a link instead).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$work/wheels" tilelang==0.1.15 'apache-tvm-ffi==0.1.12' torch-c-dlpack-ext==0.1.5 z3-solver==4.15.4.0
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$work/site"; done
rm -rf "$work"/site/z3_solver-*.data
(cd "$work/site/z3/lib" && rm libz3.so && ln -s libz3.so.4.15 libz3.so)
mkdir -p .tl
tar -cJf .tl/tl.tar.xz.part -C "$work/site" . && mv .tl/tl.tar.xz.part .tl/tl.tar.xz
ls -la .tl/tl.tar.xz
