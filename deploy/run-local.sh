#!/usr/bin/env bash
# Start every process of a local Fluxgate: the gateway and one worker (CPU here) on the embedded
# defaults: local-disk storage and, when no model is configured, the tiny random-weight FLUX model.
# Ctrl-C stops all of them.
set -euo pipefail
export FLUXGATE_DATA_DIR=${FLUXGATE_DATA_DIR:-$PWD/.fluxgate}
export PORT=${PORT:-8000}
export FLUXGATE_PUBLIC_BASE_URL=${FLUXGATE_PUBLIC_BASE_URL:-http://127.0.0.1:$PORT}
# A local-only admin key so that the README's curl examples work at once; set your own anywhere else.
export FLUXGATE_BOOTSTRAP_ADMIN_KEY=${FLUXGATE_BOOTSTRAP_ADMIN_KEY:-fg-local-admin}
# Webhooks to receivers on this machine are allowed in local runs (refused by default elsewhere).
export FLUXGATE_OUTBOUND_ALLOW_CIDRS=${FLUXGATE_OUTBOUND_ALLOW_CIDRS:-127.0.0.0/8,::1/128}

tiny="$FLUXGATE_DATA_DIR/models/flux-tiny"
if [ -z "${FLUXGATE_MODELS:-}" ] && [ ! -f "$tiny/model_index.json" ]; then
  echo "building the tiny random-weight FLUX model in $tiny"
  fluxgate make-tiny-model "$tiny"
fi

pids=()
stop() {
  trap - INT TERM EXIT
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT

fluxgate serve --host 127.0.0.1 --port "$PORT" & pids+=($!)
fluxgate worker & pids+=($!)
fluxgate sweeper & pids+=($!)
fluxgate webhooks & pids+=($!)
echo "Fluxgate on http://127.0.0.1:$PORT (admin key: $FLUXGATE_BOOTSTRAP_ADMIN_KEY). Ctrl-C stops it."
wait -n "${pids[@]}"
