#!/usr/bin/env bash
# CPU training throughput, loraforge against HF PEFT, side by side in one run on this machine:
# builds the trainer (release) and runs bench/compare.py on the CPU. Arguments go to compare.py:
#   bench/cpu_bench.sh [--seq 256] [--batch 4] [--steps 10] [--threads 2] [--rounds 3]
# Needs cargo and the Python of .ci/env.sh (torch 2.11, transformers, peft), or LORAFORGE_PYTHON.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${LORAFORGE_CACHE:-$HOME/.cache/loraforge}
PY=${LORAFORGE_PYTHON:-$CACHE/venv/bin/python}
export PATH=$(dirname "$PY"):$PATH LIBTORCH_USE_PYTORCH=1 CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
(cd "$ROOT" && cargo build -q --release -p loraforge-trainer)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$PY" "$ROOT/bench/compare.py" --trainer "$CARGO_TARGET_DIR/release/loraforge-trainer" --device cpu "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
