#!/usr/bin/env bash
# Gateway capacity (docs/performance.md, "Gateway capacity"): start `fluxgate serve` on an empty Redis
# database, drive POST /v1/jobs with wrk, optionally profile the gateway with py-spy meanwhile.
#   bench/wrk/gateway.sh [--quotas] [--workers N] [--profile OUT.svg|OUT.txt] [--duration 20s]
# Env: FLUXGATE_BENCH_REDIS_URL (default redis://127.0.0.1:6379/9: flushed first), PORT (8000).
set -euo pipefail
cd "$(dirname "$0")/../.."
quotas=0 workers=1 profile="" duration=20s
while [ $# -gt 0 ]; do
  case "$1" in
    --quotas) quotas=1 ;;
    --workers) workers="$2"; shift ;;
    --profile) profile="$2"; shift ;;
    --duration) duration="$2"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
port="${PORT:-8000}"
export FLUXGATE_REDIS_URL="${FLUXGATE_BENCH_REDIS_URL:-redis://127.0.0.1:6379/9}"
export FLUXGATE_BOOTSTRAP_ADMIN_KEY=fg-local-admin FLUXGATE_API_KEY=fg-local-admin
if [ "$quotas" = 0 ]; then
  export FLUXGATE_LIMITS__SUBMISSIONS_PER_MINUTE=0 FLUXGATE_LIMITS__MAX_QUEUED_JOBS_PER_MODEL=0 \
    FLUXGATE_LIMITS__MAX_ACTIVE_JOBS_PER_OWNER=0
else  # on, but high enough that a 20 s run stays under them: the checks' cost, not their 429s
  export FLUXGATE_LIMITS__SUBMISSIONS_PER_MINUTE=1000000 FLUXGATE_LIMITS__MAX_QUEUED_JOBS_PER_MODEL=1000000 \
    FLUXGATE_LIMITS__MAX_ACTIVE_JOBS_PER_OWNER=1000000
fi
.venv/bin/python - <<PY
import redis; redis.Redis.from_url("$FLUXGATE_REDIS_URL").flushdb()
PY
.venv/bin/fluxgate serve --port "$port" --workers "$workers" >/tmp/fluxgate-bench-serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 0.1
done
# warm-up: connections, the scripts' SHA cache, the key cache
wrk -t2 -c50 -d2s -s bench/wrk/submit.lua "http://127.0.0.1:$port/v1/jobs" >/dev/null
spies=()
if [ -n "$profile" ]; then
  fmt=flamegraph; case "$profile" in *.txt) fmt=raw ;; esac
  pids=$(pgrep -P "$server" -d, || true); pids="${pids:+$pids,}$server"
  for pid in ${pids//,/ }; do
    .venv/bin/py-spy record -p "$pid" -d 10 -r 200 -f "$fmt" -o "$profile.$pid" >/dev/null 2>&1 &
    spies+=($!)
  done
fi
wrk -t2 -c50 -d"$duration" -s bench/wrk/submit.lua --latency "http://127.0.0.1:$port/v1/jobs"
for spy in "${spies[@]}"; do wait "$spy" || true; done
