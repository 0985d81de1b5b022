#!/bin/bash
# One GPU-machine call: where a training step's GPU time goes, kernel by kernel (Nsight Compute),
# for a shape and each of the paths given (LORAFORGE_LAYER_BY_HAND values). bench/gpu.md,
# "Where a step's time goes". Results under $OUT: ncu-SHAPE-MODE.csv.gz, summarised by
# bench/ncu_summary.py into log.txt. Runs from `.gpu/` (gpu_run.sh's header):
# LAYERS=N profiles a model of the shape's width with N decoder layers (fewer kernels to replay,
# the same per-layer work; the step's total then needs scaling by layers).
#   cp bench/gpu_ncu.sh .gpu/ncu.sh   # then, on the GPU machine: bash .gpu/ncu.sh llama3-8b 2048 2 on,mlp
set -u
cd "$(dirname "$0")"
gunzip -kf loraforge-trainer.gz && chmod +x loraforge-trainer || exit 1
source ./gpu_env.sh
shape=${1:-llama3-8b} seq=${2:-2048} batch=${3:-2} modes=${4:-on}
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "no ncu on this machine"; exit 1; }
work=/tmp/work-$shape${LAYERS:+-$LAYERS}
# Builds the model and the job (and times one short run, which also warms the page cache).
timeout 300 python3 bench/gpu_bench.py --trainer ./loraforge-trainer --shape "$shape" --seq "$seq" \
  --batch "$batch" --steps 2 --only loraforge --work "$work" ${LAYERS:+--layers $LAYERS} 2>&1 | tail -3
python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); j["training"]["max_steps"]=2; json.dump(j,open(sys.argv[2],"w"))' \
  "$work/job-loraforge.json" "$work/job-ncu.json" || exit 1
profiles=()
for mode in ${modes//,/ }; do
  csv=$OUT/ncu-$shape${LAYERS:+-$LAYERS}-$mode.csv
  LORAFORGE_LAYER_BY_HAND=$mode timeout 400 "$ncu" --clock-control none --cache-control none \
    --metrics gpu__time_duration.sum --csv --log-file "$csv" \
    ./loraforge-trainer train --spec "$work/job-ncu.json" --out /tmp/ncu-out --device cuda > /dev/null 2>&1
  echo "$mode: ncu exit $?, $(wc -l < "$csv") lines"
  gzip -f "$csv" && profiles+=("$mode" "$csv.gz")
done
python3 bench/ncu_summary.py "${profiles[@]}" | tee -a "$OUT/log.txt"
