#!/usr/bin/env bash
# Runs every check and test of the workspace, installing what they need first. Idempotent:
# safe to run again and again, on a fresh machine or in CI (.ci/run calls it).
#
# What the tests need today: the Rust toolchain with rustfmt and clippy; Python 3 with venv for
# the Nacos Python SDKs that crates/sextant/tests/nacos_python.rs drives and for grpcio, the
# Python xDS client of crates/sextant/tests/xds_clients.rs (installed below into .venv/, pinned
# by tests/nacos/requirements-*.txt and tests/xds/requirements.txt); Node.js with npm for the
# Node xDS client of the same test (installed into tests/xds/node/node_modules from its
# package-lock.json). No external server: integration tests start the real `sextant` binary on
# loopback ports with temporary data dirs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust from https://rustup.rs, then run this again" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi

# --- Python venvs with the Nacos Python SDKs (crates/sextant/tests/nacos_python.rs) ----------
# .venv/nacos-v2: nacos-sdk-python 3.x (Nacos 2.x gRPC), .venv/nacos-v1: the old 1.x-line client
# (Nacos 1.x HTTP Open API). Each is built from its pinned requirements file and stamped with a
# copy of it; a venv whose stamp matches and whose interpreter runs is left alone (fast re-runs),
# any other is built again from scratch.
find_venv_python() {
  local py
  for py in python3 /usr/bin/python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
      command -v "$py"
      return 0
    fi
  done
  return 1
}

if ! PYTHON=$(find_venv_python); then
  # A fresh Debian has python3 without its venv module (package python3-venv), or no python3.
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
    echo "== installing python3 and python3-venv (apt-get)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
  fi
  if ! PYTHON=$(find_venv_python); then
    echo "python3 with the venv module is needed (Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
fi

# make_venv DIR REQUIREMENTS IMPORT: builds DIR from REQUIREMENTS unless it is current already,
# then checks that IMPORT imports.
make_venv() {
  local dir=$1 req=$2 module=$3
  local stamp="$dir/sextant-requirements.txt"
  if [ -f "$stamp" ] && cmp -s "$req" "$stamp" \
    && "$dir/bin/python" -c "import $module" >/dev/null 2>&1; then
    echo "== $dir is current ($req)"
    return 0
  fi
  echo "== building $dir from $req with $PYTHON"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$req"
  "$dir/bin/python" -c "import $module"
  cp "$req" "$stamp"
}
make_venv .venv/nacos-v2 tests/nacos/requirements-v2.txt v2.nacos
make_venv .venv/nacos-v1 tests/nacos/requirements-v1.txt nacos
# .venv/xds: grpcio, whose built-in xds resolver crates/sextant/tests/xds_clients.rs drives.
make_venv .venv/xds tests/xds/requirements.txt grpc

# --- Node gRPC with its xDS plug-in (crates/sextant/tests/xds_clients.rs) ---------------------
# tests/xds/node/node_modules: @grpc/grpc-js + @grpc/grpc-js-xds, exactly as package-lock.json
# says (npm ci). Stamped with a copy of the lock file like the venvs: a current install is left
# alone, any other is made again from scratch. Debian's nodejs and npm are installed with apt-get
# when node or npm is missing.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
    echo "== installing nodejs and npm (apt-get)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
  fi
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "node and npm are needed (Debian: apt-get install nodejs npm)" >&2
    exit 1
  fi
fi
make_node_modules() {
  local dir=$1
  local stamp="$dir/node_modules/.sextant-package-lock.json"
  if [ -f "$stamp" ] && cmp -s "$dir/package-lock.json" "$stamp" \
    && (cd "$dir" && node -e "require('@grpc/grpc-js-xds')") >/dev/null 2>&1; then
    echo "== $dir/node_modules is current"
    return 0
  fi
  echo "== npm ci in $dir with node $(node --version)"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  (cd "$dir" && node -e "require('@grpc/grpc-js-xds')")
  cp "$dir/package-lock.json" "$stamp"
}
make_node_modules tests/xds/node

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== all tests passed"
