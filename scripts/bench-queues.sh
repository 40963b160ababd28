#!/usr/bin/env bash
# Durable queues side by side on RabbitMQ and Rill: `rill bench amqp` (one publisher with
# confirms sending persistent messages, one consumer acking each delivery) against a private
# RabbitMQ node and target/release/rill, alternating runs, then a table of medians and ratios.
#
#   scripts/bench-queues.sh [REPS] [DURATION]
#   env KINDS="stream priority classic"  SIZES="16"  CLIENT=wire|lapin
# CLIENT=wire (default) is the pipelined client that leaves the CPU to the broker; lapin's
# own CPU use bounds the figure on a 2-core machine (see crates/rill/src/bench_wire.rs).
# Needs rabbitmq-server (installed with apt-get if missing) and ../shared/bench/rabbitmq.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}
DUR=${2:-10}
KINDS=${KINDS:-"stream priority classic"}
SIZES=${SIZES:-${SIZE:-16}}
CLIENT=${CLIENT:-wire}
RABBIT_PORT=${RABBIT_PORT:-5694}
RILL_PORT=${RILL_PORT:-5695}
SHARED=${SHARED:-../shared/bench}
WORK=$(mktemp -d /tmp/rill-bench-queues.XXXXXX)
LOG="$WORK/runs.log"

cargo build --release -q -p rill
command -v /usr/lib/rabbitmq/bin/rabbitmq-server >/dev/null || {
    apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null; }

RILL_PID=""
cleanup() {
    [ -n "$RILL_PID" ] && kill "$RILL_PID" 2>/dev/null || true
    "$SHARED/rabbitmq.sh" stop "$WORK/rabbit" >/dev/null 2>&1 || true
}
trap cleanup EXIT
RABBITMQ_ANCHOR_STATE="$WORK/rabbit.last" "$SHARED/rabbitmq.sh" start "$RABBIT_PORT" "$WORK/rabbit" >/dev/null
RABBIT_PID=$(cat "$WORK/rabbit/rabbit.pid")
target/release/rill server --port "$RILL_PORT" --data-dir "$WORK/rill-data" >"$WORK/rill.out" 2>&1 &
RILL_PID=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$RILL_PORT") 2>/dev/null && break; sleep 0.1; done

one() {  # broker port pid kind size
    target/release/rill bench amqp --uri "amqp://guest:guest@127.0.0.1:$2/%2f" --kind "$4" \
        --size "$5" --client "$CLIENT" --duration "$DUR" --broker-pid "$3" 2>>"$WORK/bench.err" \
        | grep '^JSON ' | sed "s/^JSON {/JSON {\"broker\":\"$1\",/" | tee -a "$LOG"
}
echo "# $(date -u +%FT%TZ) cores=$(nproc) reps=$REPS duration=${DUR}s sizes='$SIZES' kinds='$KINDS' client=$CLIENT"
for size in $SIZES; do
    for kind in $KINDS; do
        for _ in $(seq 1 "$REPS"); do
            one rabbitmq "$RABBIT_PORT" "$RABBIT_PID" "$kind" "$size"
            one rill "$RILL_PORT" "$RILL_PID" "$kind" "$size"
        done
    done
done
python3 - "$LOG" <<'PY'
import json, statistics, sys
runs = [json.loads(l[5:]) for l in open(sys.argv[1]) if l.startswith("JSON ")]
cells = {}
for r in runs:
    cells.setdefault((r["kind"], r["size"], r["broker"]), []).append(r)
def med(rs, k):
    v = [r[k] for r in rs if r.get(k) is not None]
    return statistics.median(v) if v else None
print("| queue | size | broker | con msg/s | pub msg/s | broker CPU % | msgs per broker CPU-s |")
print("|---|---|---|---|---|---|---|")
for kind, size in dict.fromkeys((r["kind"], r["size"]) for r in runs):
    row = {}
    for b in ("rabbitmq", "rill"):
        rs = cells.get((kind, size, b), [])
        row[b] = [med(rs, k) for k in ("con_per_s", "pub_per_s", "broker_cpu_pct", "msgs_per_broker_cpu_s")]
        print(f"| {kind} | {size} | {b} | " + " | ".join("-" if x is None else f"{x:,.0f}" for x in row[b]) + " |")
    ratio = [(a / b if a and b else None) for a, b in zip(row["rill"], row["rabbitmq"])]
    print(f"| {kind} | {size} | **rill/rabbitmq** | " + " | ".join("-" if x is None else f"{x:.2f}x" for x in ratio) + " |")
PY
echo "# raw runs: $LOG"
