#!/usr/bin/env bash
# One device call: GPU tests on the tiny twin, then bench rows. Usage (on the GPU machine, project root):
#   bash bench/gpu_session.sh tests|kernels|train CASES...|infer|entry SETTINGS...|serve [ARGS]|gen [ARGS]|peers [ARGS]|dpo [ARGS]
# Expects ../shared/device/README.md's wheels in .whl (carried); results go to $OUT.
set -uo pipefail
# a warm machine keeps .site from its last call: reinstall only when the carried wheels differ (the install
# ran on every call and printed a warning for every package already there)
stamp=$(ls -l .whl/*.whl | awk '{print $5, $NF}' | sha1sum | cut -d' ' -f1)
if [ "$(cat .site/.wheels 2>/dev/null)" != "$stamp" ]; then
  rm -rf .site && python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 1
  echo "$stamp" > .site/.wheels
fi
# tilelang and its libraries (bench/tilelang_bundle.sh, carried in .tl): flash-linear-attention's kernel for
# the gated delta rule backward on Hopper, where Triton 3.4-3.7.0 computes it wrong and fla refuses it. A warm
# machine keeps .tlsite (git-ignored) from an earlier call, so a call whose carry has no room for .tl (peers:
# .whl and .peers_whl) still runs fla as shipped when it follows one that carried it
extra=
if [ -f .tl/tl.tar.xz ] || [ -d .tlsite/tilelang ]; then
  [ -d .tlsite/tilelang ] || { mkdir -p .tlsite && tar -xJf .tl/tl.tar.xz -C .tlsite; }
  extra=:$PWD/.tlsite
  if ! command -v nvcc >/dev/null && [ -z "${CUDA_HOME:-}" ]; then  # tilelang compiles its kernels with nvcc
    nvcc=$(find /usr/local /opt -name nvcc -type f -path '*/bin/nvcc' 2>/dev/null | head -1)
    [ -n "$nvcc" ] && export CUDA_HOME=$(dirname "$(dirname "$nvcc")")
  fi
  echo "tilelang bundle in .tlsite; nvcc: $(command -v nvcc || echo "${CUDA_HOME:-none}")"
fi
export PYTHONPATH=$PWD:$PWD/.site:$PWD/.gpu_extra$extra PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# Triton's autotuning results (fla's kernels keep theirs on disk: small JSON files, one per kernel and shape
# key): a fresh machine spends minutes benchmarking every config of every kernel before MiniCPM-V 4.6's first
# step. Each call returns them in $OUT/triton_autotune.tar; carried back as .triton_autotune/ (same image and
# fla), the next fresh machine starts from them and only compiles the chosen configs.
triton_cache=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
if [ -f .triton_autotune/triton_autotune.tar ]; then
  mkdir -p "$triton_cache" && tar -xf .triton_autotune/triton_autotune.tar -C "$triton_cache" \
    && echo "triton autotune results restored: $(tar -tf .triton_autotune/triton_autotune.tar | grep -c autotune.json)"
fi
save_autotune() {
  [ -d "$triton_cache" ] || return 0
  (cd "$triton_cache" && find . -name '*.autotune.json' | tar -cf "$OUT/triton_autotune.tar" -T -) 2>/dev/null || true
}
trap save_autotune EXIT
trap "exit 143" TERM INT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
what=$1; shift
case $what in
  # the whole log in $OUT as it runs: a call stopped at its limit still returns what had passed
  tests) python3 -m pytest -q -p no:cacheprovider -m gpu tests/entry/test_gpu.py -x "$@" 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -40 ;;
  # the HF-native families' GPU paths: varlen packed attention, flash-linear-attention, liger, the static-cache
  # compiled decode and the running batch (tiny twins)
  kernels) python3 -m pytest -q -p no:cacheprovider -m gpu tests/families/test_packing_gpu.py \
    tests/families/test_kernels_gpu.py tests/families/test_decoding_gpu.py tests/families/test_vision_compile_gpu.py "$@" 2>&1 | tee "$OUT/kernels_tests.txt" ;;
  train) python3 -m bench.bench --only train --steps 4 --cases "$@" --out "$OUT/train.json" ;;
  infer) python3 -m bench.bench --only infer --out "$OUT/infer.json" ;;
  # the real job through python -m pipeline; model and data are built under /tmp/entry-work in the call
  entry) python3 -m bench.entry_bench --out "$OUT" --work /tmp/entry-work --timeout "${SETTING_TIMEOUT:-900}" --settings "$@" ;;
  serve) python3 bench/serve_bench.py --out "$OUT/serve.json" "$@" ;;
  # generation: every family's infer stage (200 COCO-shaped rows, batch 16, 64 new tokens; load and generation
  # apart), the server at 1/8/32 clients against one at a time (MiniCPM-V-2, Qwen2.5-VL-3B), the static-cache
  # comparison; full-size random weights written under /tmp/gen-work; within --budget (530 s) of one call
  gen) python3 -m bench.gen_bench --out "$OUT" --work /tmp/gen-work "$@" ;;
  # our row beside TRL's and ms-swift's on the same folders and rows (bench/peers.py); each peer's wheels
  # (bench/peers_wheels.sh, carried in .peers_whl) go to their own --target dir, never into .site
  peers)
    for peer in trl swift; do
      python3 -m pip install -q --no-index --no-deps --no-compile --target ".peers/$peer" .peers_whl/$peer/*.whl || exit 1
    done
    PEERS_TRL=$PWD/.peers/trl PEERS_SWIFT=$PWD/.peers/swift python3 -m bench.peers --out "$OUT" --work /tmp/entry-work \
      --timeout "${SETTING_TIMEOUT:-200}" "$@" ;;
  # DPO (LoRA-qkv) through python -m pipeline +experiment=dpo beside TRL's DPOTrainer (bench/dpo_bench.py);
  # TRL's wheels as for peers
  dpo)
    python3 -m pip install -q --no-index --no-deps --no-compile --target .peers/trl .peers_whl/trl/*.whl || exit 1
    PEERS_TRL=$PWD/.peers/trl python3 -m bench.dpo_bench --out "$OUT" --work /tmp/entry-work \
      --timeout "${SETTING_TIMEOUT:-900}" "$@" ;;
esac
