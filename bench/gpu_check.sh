#!/bin/bash
# One GPU-machine call that checks the CUDA paths before any timing (bench/gpu.md, "Correctness
# on the GPU"): the GPU tests with their whole output, the 200-step loss curve against PEFT of
# the CUDA default (the whole layer by hand) and of the MLP alone by hand (one PEFT run for
# both), then TinyLlama side by side (PEFT, PEFT + Liger, the default, the MLP alone by hand).
# Results under $OUT: gpu-tests.txt, loss_curve_default.json, loss_curve_mlp.json,
# tinyllama-2048-8.json, log.txt. About four minutes on an H100.
# It runs from the folder gpu_run.sh describes (`.gpu/`), which also holds this script and the
# test binary (`tests.gz`):
#   cp bench/gpu_check.sh .gpu/check.sh   # then, on the GPU machine: bash .gpu/check.sh
set -u
cd "$(dirname "$0")"
gunzip -kf tests.gz loraforge-trainer.gz && chmod +x tests loraforge-trainer || exit 1
source ./gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
timeout 120 ./tests --ignored cuda --nocapture --test-threads 1 > "$OUT/gpu-tests.txt" 2>&1
echo "tests: exit $?" >> "$OUT/gpu-tests.txt"
grep -E "^factor|^test |panicked|exit" "$OUT/gpu-tests.txt"
curve=(python3 bench/loss_curve.py --trainer ./loraforge-trainer --seq 1024 --batch 8 --steps 200
       --lr 2e-4 --work /tmp/loss-curve)
timeout 170 "${curve[@]}" --json-out "$OUT/loss_curve_default.json"
LORAFORGE_LAYER_BY_HAND=mlp timeout 90 "${curve[@]}" --peft-from "$OUT/loss_curve_default.json" \
  --json-out "$OUT/loss_curve_mlp.json"
rm -f tests
bash run.sh tinyllama:2048:8:peft,liger,loraforge,loraforge-mlp:200
