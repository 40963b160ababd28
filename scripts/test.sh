#!/usr/bin/env bash
# The one test command: README.md and .ci/run call exactly this.
#
# Installs what the interop suite needs (a Python venv at .venv with the pinned
# clients from tests/interop/requirements.txt, and Debian's rabbitmq-server, which
# some tests run as a private node to compare with), builds the `rill` binary, runs
# fmt/clippy/cargo tests, then drives the real binary with pika, aio-pika and
# kombu (tests/interop). Works as root on a fresh Debian box with Rust and
# python3 installed; never reads stdin. Any failing step fails the script, and
# a pytest run that collects no tests counts as a failure. After the build, every
# check runs even if an earlier one failed, so one run reports all broken stages.
#
# Environment:
#   AMQP_TEST_URL   run the interop suite against that broker instead of
#                   starting target/debug/rill (e.g. a real RabbitMQ)
#   PYTEST_ARGS     extra arguments for pytest (e.g. "-k queue -x")
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

step "python venv (.venv)"
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    # Debian splits venv/ensurepip into python3-venv.
    if command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq </dev/null
        apt-get install -y -qq python3-venv </dev/null
    else
        echo "python3 venv support is missing and apt-get is unavailable" >&2
        exit 1
    fi
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -r tests/interop/requirements.txt </dev/null

step "rabbitmq-server (the reference broker some interop tests compare with)"
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    if command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq </dev/null
        # The Debian package starts no service here (no systemd); tests run private nodes.
        apt-get install -y -qq rabbitmq-server </dev/null
    else
        echo "rabbitmq-server is missing and apt-get is unavailable" >&2
        exit 1
    fi
fi

step "cargo build -p rill (and the job example the interop suite runs)"
cargo build -p rill
cargo build -p rill-jobs --example order_totals
export RILL_BIN="${RILL_BIN:-$root/target/debug/rill}"

# The checks below all run even when one fails, so a single CI run reports every
# broken stage; the script still exits non-zero if any of them failed.
failed=()
check() {
    local name=$1
    shift
    step "$name"
    local rc=0
    "$@" </dev/null || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "FAILED: $name (exit $rc)" >&2
        failed+=("$name")
    fi
    return 0
}

pytest_interop() {
    local rc=0
    # shellcheck disable=SC2086
    .venv/bin/python -m pytest tests/interop ${PYTEST_ARGS:-} || rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests: treating as failure" >&2
    fi
    return "$rc"
}

check "cargo fmt --check" cargo fmt --all -- --check
check "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
check "cargo test" cargo test --workspace
check "pytest tests/interop" pytest_interop

if [ "${#failed[@]}" -ne 0 ]; then
    printf '\n==> FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
printf '\n==> all checks passed\n'
