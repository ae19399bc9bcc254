#!/usr/bin/env bash
# Download the peers' wheels (bench/peers.py: TRL, ms-swift) for the GPU machine into .peers_whl/trl and
# .peers_whl/swift (git-ignored), one folder per peer: `bash bench/gpu_session.sh peers` installs each with
# `pip install --no-deps --target .peers/<peer>`, never into the project's .site, so that the torch and
# transformers the project is measured with stay as they are. Run from the project root, beside
# ../shared/device/wheels.sh; carry both: carry [".whl", ".peers_whl"]. bench/peers_wheels.md says why these.
set -euo pipefail
exclude=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.peers_whl/' "$exclude" 2>/dev/null || echo '/.peers_whl/' >> "$exclude"
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
get() { python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$@"; }
# TRL 1.16 runs on the project's own transformers/peft/accelerate/datasets: only itself.
get .peers_whl/trl trl==1.16.0
# ms-swift 4.6 pins transformers<5.20, peft<0.21, trl<1.0, datasets<4.8.5: its own, in its own folder; then what
# `swift sft` imports that the GPU image lacks (modelscope and its hub client, which needs cryptography; the
# Qwen templates' qwen_vl_utils; liger-kernel for --use_liger_kernel; pydantic and its parts, which swift's
# import needed on the 2026-12-05 H200).
get .peers_whl/swift ms-swift==4.6.0 transformers==5.19.0 peft==0.20.0 trl==0.29.1 datasets==4.8.4 \
  modelscope==1.40.2 modelscope-hub==0.5.1 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 addict==2.4.0 \
  attrdict==2.0.1 binpacking==2.0.1 dacite==1.9.2 json-repair==0.64.6 zstandard==0.25.0 qwen-vl-utils==0.0.14 \
  liger-kernel==0.8.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -1 .peers_whl/*
du -sh .peers_whl
