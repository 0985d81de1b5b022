#!/bin/bash
# One GPU-machine call: install Liger's wheel, then bench/gpu_bench.py for the shapes given as
# "shape:seq:batch:contenders[:seconds]" arguments. Results under $OUT. GPU_BENCH_ARGS adds
# options to every gpu_bench.py call (GPU_BENCH_ARGS=--profile: the results are then named
# SHAPE-SEQ-BATCH-profile.json, so a profiled pass can follow a timed one in the same call).
# It runs from a folder (`.gpu/`, ignored by git) that holds a copy of this script as run.sh, the
# release trainer built here and stripped (loraforge-trainer; loraforge-before and any other
# loraforge-NAME: earlier builds, contenders of those names), bench/*.py and whl/liger_kernel-*.whl:
#   mkdir -p .gpu/bench .gpu/whl && cp bench/gpu_run.sh .gpu/run.sh && cp bench/gpu_env.sh .gpu/
#   cp bench/*.py .gpu/bench/
#   strip -o .gpu/loraforge-trainer $CARGO_TARGET_DIR/release/loraforge-trainer
#   pip download --no-deps --only-binary=:all: -d .gpu/whl liger-kernel==0.8.5
# The GPU tests (bench/gpu.md, "Correctness on the GPU") travel as the release test binary:
#   cargo test --release -p loraforge-trainer --no-run   # prints the binary's path
#   strip -o .gpu/tests PATH && gzip .gpu/tests          # there: gunzip, then ./tests --ignored cuda
set -u
cd "$(dirname "$0")"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
source ./gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The card's clocks, power and throttle reasons every half second while the benchmarks run
# (clocks.csv): a step slower than its kernels' sum may be a card slowed by its power limit.
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 500 > "$OUT/clocks.csv" 2>&1 &
trap "kill $! 2>/dev/null" EXIT
python3 -c 'import torch, transformers, peft, liger_kernel; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
# Builds may come gzipped (a device call carries 64 MiB at most; three builds are 62 MiB).
for z in loraforge-*.gz; do [ -e "$z" ] && gunzip -kf "$z"; done
chmod +x ./loraforge-trainer
# The contenders `loraforge-hand`, `loraforge-mlp` and `loraforge-autograd`: the same trainer
# with the whole layer by hand (the default), the MLP alone, or none of it
# (LORAFORGE_LAYER_BY_HAND, docs/trainer.md).
for mode in hand:on mlp:mlp autograd:off; do
  printf '#!/bin/sh\nLORAFORGE_LAYER_BY_HAND=%s exec "$(dirname "$0")/loraforge-trainer" "$@"\n' \
    "${mode#*:}" > "loraforge-${mode%%:*}"
done
# Any other build here (loraforge-before, loraforge-NAME) runs as the contender of its name.
others=()
for bin in loraforge-*; do
  case $bin in loraforge-trainer|*.gz) ;; *) chmod +x "$bin"; others+=(--other-trainer "$bin=./$bin");; esac
done
tag=; [[ "${GPU_BENCH_ARGS:-}" == *--profile* ]] && tag=-profile
for spec in "$@"; do
  IFS=: read shape seq batch only limit <<<"$spec"
  echo "=== $shape seq $seq batch $batch: $only ($(date -u +%T))"
  rm -rf /tmp/work-$shape/out-*; mkdir -p /tmp/work-$shape
  timeout ${limit:-560} python3 bench/gpu_bench.py --trainer ./loraforge-trainer \
    ${others[@]+"${others[@]}"} --shape $shape --seq $seq --batch $batch --steps 10 --only $only \
    --work /tmp/work-$shape --json-out $OUT/$shape-$seq-$batch$tag.json ${GPU_BENCH_ARGS:-} 2>&1 | tee -a $OUT/log.txt
done
