#!/bin/bash
# One GPU-machine call: how far apart 200-step loss curves of the same training land when only
# the order of bf16 roundings differs (bench/gpu.md, "How wide is the band?"): PEFT's curve beside
# the MLP by hand's (LORAFORGE_LAYER_BY_HAND=mlp), then against the same PEFT curve the whole
# layer by hand (on), and on with LORAFORGE_CUDA_KERNELS=off, -rope or -rms_norm (libtorch's
# operations in place of all our kernels or of one family). CURVES replaces those runs with its
# own, NAME:LAYER_BY_HAND:KERNELS each (off:off: is autograd's whole layer; the first runs beside
# PEFT); PEFT_FROM=FILE takes PEFT's curve from an earlier lc-*.json instead; PROFILE_METHODS=adalora,...
# adds bench/methods/overhead.py --profile for those methods. Results under $OUT: lc-NAME.json
# (loss_curve.py's), summarised in log.txt by bench/curve_band.py. About four minutes on an H100.
# Runs from `.gpu/` (gpu_run.sh's header):
#   cp bench/gpu_curves.sh .gpu/curves.sh   # then, on the GPU machine: bash .gpu/curves.sh
set -u
cd "$(dirname "$0")"
gunzip -kf loraforge-trainer.gz && chmod +x loraforge-trainer || exit 1
source ./gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
curve=(python3 bench/loss_curve.py --trainer ./loraforge-trainer --seq 1024 --batch 8 --steps 200
       --lr 2e-4 --work /tmp/loss-curve)
# NAME:LORAFORGE_LAYER_BY_HAND:LORAFORGE_CUDA_KERNELS; the first runs beside PEFT (unless
# PEFT_FROM gives PEFT's curve), the others against that PEFT curve.
runs=(${CURVES:-mlp:mlp: on:on: on-kernels-off:on:off on-no-rope:on:-rope on-no-rms-norm:on:-rms_norm})
ref=
if [ -n "${PEFT_FROM:-}" ]; then
  ref=$OUT/lc-ref.json; cp "$PEFT_FROM" "$ref"
fi
for run in "${runs[@]}"; do
  IFS=: read name mode kernels <<<"$run"
  export LORAFORGE_LAYER_BY_HAND=$mode LORAFORGE_CUDA_KERNELS=$kernels
  if [ -z "$ref" ]; then
    ref=$OUT/lc-$name.json
    timeout 170 "${curve[@]}" --json-out "$ref"
  else
    timeout 90 "${curve[@]}" --peft-from "$ref" --json-out "$OUT/lc-$name.json"
  fi
done
unset LORAFORGE_LAYER_BY_HAND LORAFORGE_CUDA_KERNELS
python3 bench/curve_band.py "$ref" $(ls "$OUT"/lc-*.json | grep -v "^$ref$") | tee -a "$OUT/log.txt"
# Where the adaptive methods' busy phase spends its time (bench/methods.md): each phase per step.
[ -n "${PROFILE_METHODS:-}" ] && timeout 200 python3 bench/methods/overhead.py --trainer ./loraforge-trainer \
  --rounds 1 --methods "$PROFILE_METHODS" --profile 2>&1 | grep -v "^round" | tee "$OUT/methods-profile.txt"
