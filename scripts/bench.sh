#!/usr/bin/env bash
# Cross-peer benchmarks of imgcache (see BENCHMARKS.md).
#
# Starts a Redis of its own on 127.0.0.1 (a free port, no persistence), runs the benchmarks in
# bench/ ROUNDS times, interleaved (each round runs every row once, so drift and noise hit every
# row alike), prints each row's median and min-max with the ratio imgcache/peer, runs the hit-ratio
# simulation, draws the plots and stops its Redis. Everything goes to bench/results/ (gitignored).
# About 6 minutes on 2 cores with the defaults.
#
#   bash scripts/bench.sh                      # ROUNDS=6 BENCHTIME=400ms
#   ROUNDS=3 BENCHTIME=200ms bash scripts/bench.sh
set -euo pipefail

ROUNDS=${ROUNDS:-6}
BENCHTIME=${BENCHTIME:-400ms}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
RESULTS=$BENCH/results
START=$(date +%s)

log() { printf '[bench.sh %4ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }

# Redis: the Debian package, installed if missing.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
	log "installing redis-server"
	SUDO=""
	[ "$(id -u)" -eq 0 ] || SUDO=sudo
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

# A free port: one nothing answers on.
PORT=""
for _ in $(seq 1 50); do
	p=$((20000 + RANDOM % 20000))
	if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then
		PORT=$p
		break
	fi
done
[ -n "$PORT" ] || { log "no free port found"; exit 1; }

REDIS_DIR=$(mktemp -d)
REDIS_PID=""
cleanup() {
	if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
		kill "$REDIS_PID" 2>/dev/null || true
		wait "$REDIS_PID" 2>/dev/null || true
	fi
	rm -rf "$REDIS_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis-server --bind 127.0.0.1 --port "$PORT" --save '' --appendonly no --dir "$REDIS_DIR" \
	--logfile "$REDIS_DIR/redis.log" --daemonize no &
REDIS_PID=$!
for _ in $(seq 1 50); do
	redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
	sleep 0.1
done
redis-cli -p "$PORT" ping >/dev/null || { log "redis-server did not start"; cat "$REDIS_DIR/redis.log" >&2; exit 1; }
export REDIS_ADDR=127.0.0.1:$PORT
log "redis $(redis-server --version | awk '{print $3}') on $REDIS_ADDR (pid $REDIS_PID)"

mkdir -p "$RESULTS"
RAW=$RESULTS/raw.txt
{
	echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) ROUNDS=$ROUNDS BENCHTIME=$BENCHTIME"
	echo "# $(go version); $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
	echo "# redis $(redis-server --version | awk '{print $3}') on loopback, REDIS_ADDR=$REDIS_ADDR"
	echo "# commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (work tree modified)')"
} >"$RAW"
cp "$RAW" "$RESULTS/machine.txt"

cd "$BENCH"
log "building"
go vet ./...
go test -count 1 -run . ./... >/dev/null # the unit tests, and a build the rounds reuse

for r in $(seq 1 "$ROUNDS"); do
	log "round $r/$ROUNDS"
	redis-cli -p "$PORT" flushall >/dev/null # our own Redis: keep its memory flat between rounds
	timeout 240 go test -run '^$' -bench . -benchtime "$BENCHTIME" -count 1 . >"$RESULTS/round$r.txt" 2>&1 || {
		log "round $r failed:"
		tail -30 "$RESULTS/round$r.txt" >&2
		exit 1
	}
	cat "$RESULTS/round$r.txt" >>"$RAW"
done

log "summary"
go run ./cmd/benchsum -json "$RESULTS/summary.json" "$RAW" | tee "$RESULTS/summary.md"
BENCHSTAT=$(command -v benchstat || true)
[ -n "$BENCHSTAT" ] || [ ! -x "$HOME/go/bin/benchstat" ] || BENCHSTAT=$HOME/go/bin/benchstat
if [ -n "$BENCHSTAT" ]; then
	"$BENCHSTAT" "$RAW" >"$RESULTS/benchstat.txt" 2>&1 || true
	log "benchstat's view: $RESULTS/benchstat.txt"
fi

log "hit ratios"
timeout 180 go run ./cmd/hitratio -csv "$RESULTS/hitratio.csv" | tee "$RESULTS/hitratio.md"

log "plots"
go run ./cmd/plot -summary "$RESULTS/summary.json" -hitratio "$RESULTS/hitratio.csv" -out "$RESULTS"
log "done: $(cd "$RESULTS" && ls ./*.png | xargs) in $RESULTS"
