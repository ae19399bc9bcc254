#!/usr/bin/env bash
# Builds every git-ignored bundle that the device calls of bench/RESULTS.md ("Calls left") carry, in one go,
# from the project root on the development machine (package index needed, no GPU): skips a bundle that is
# already there unless FORCE=1.
#   .whl        ../shared/device/wheels.sh + transformers, the kernel levers (liger, fla), pytest, the server's
#               packages (~23 MiB)
#   .whl5       .whl without liger/fla/einops, with bitsandbytes (QLoRA calls; within the 64 MiB carry)
#   .gpu_extra  pycocoevalcap's bleu, cider and rouge (the eval stage's metrics; pure Python)
#   .tl         tilelang for flash-linear-attention on Hopper (bench/tilelang_bundle.sh)
#   .peers_whl  TRL and ms-swift (bench/peers_wheels.sh)
# Usage: bash bench/device_bundles.sh [whl whl5 gpu_extra tl peers]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for folder in /.whl/ /.whl5/ /.gpu_extra/ /.tl/ /.peers_whl/ /.site/ /.tlsite/ /.triton_autotune/; do
  grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >> "$exclude"
done
# the versions measured in bench/RESULTS.md (transformers 5.24.0 on the GPU image's torch 2.11)
BASE=(transformers==5.24.0 huggingface_hub==1.33.0 pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 pygments==2.21.0
  fastapi==0.165.0 uvicorn==0.55.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  annotated-doc==0.0.7 typing-inspection==0.4.5 h11==0.16.0 anyio==4.16.0 sniffio==1.3.1 opentelemetry-api==1.45.2
  importlib-metadata zipp)
KERNELS=(liger-kernel==0.8.5 flash-linear-attention==0.6.0 fla-core==0.6.0 einops==0.8.2)
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(whl whl5 gpu_extra tl peers)
fresh() { [ "${FORCE:-0}" = 1 ] || [ ! -e "$1" ]; }
for what in "${wanted[@]}"; do
  case $what in
    whl) if fresh .whl; then rm -rf .whl; ../shared/device/wheels.sh "${BASE[@]}" "${KERNELS[@]}"; fi ;;
    whl5)
      if fresh .whl5; then
        rm -rf .whl5 && mkdir -p .whl5.part
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
          --platform manylinux2014_x86_64 --platform any -d .whl5.part bitsandbytes==0.50.2
        [ -d .whl ] || { echo ".whl5 is made from .whl: build whl first" >&2; exit 1; }
        for wheel in .whl/*.whl; do
          # the QLoRA rows need no kernels nor pytest (bitsandbytes leaves no room for them in the carry)
          case $(basename "$wheel") in liger_kernel-*|flash_linear_attention-*|fla_core-*|einops-*) ;;
            pytest-*|pluggy-*|iniconfig-*|pygments-*) ;;
            *) cp "$wheel" .whl5.part/ ;; esac
        done
        mv .whl5.part .whl5
      fi ;;
    gpu_extra)
      if fresh .gpu_extra; then
        src=$(python3 -c "import importlib.util as u; print(u.find_spec('pycocoevalcap').submodule_search_locations[0])" 2>/dev/null \
          || .venv/bin/python -c "import importlib.util as u; print(u.find_spec('pycocoevalcap').submodule_search_locations[0])")
        rm -rf .gpu_extra.part && mkdir -p .gpu_extra.part/pycocoevalcap
        touch .gpu_extra.part/pycocoevalcap/__init__.py
        for metric in bleu cider rouge; do cp -r "$src/$metric" .gpu_extra.part/pycocoevalcap/; done
        find .gpu_extra.part -name __pycache__ -prune -exec rm -rf {} +
        rm -rf .gpu_extra && mv .gpu_extra.part .gpu_extra
      fi ;;
    tl) if fresh .tl/tl.tar.xz; then bash bench/tilelang_bundle.sh; fi ;;
    peers) if fresh .peers_whl; then bash bench/peers_wheels.sh; fi ;;
    *) echo "unknown bundle $what (whl whl5 gpu_extra tl peers)" >&2; exit 2 ;;
  esac
done
du -sh .whl .whl5 .gpu_extra .tl .peers_whl 2>/dev/null || true
