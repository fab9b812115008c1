#!/usr/bin/env bash
# Start a local Redis if none answers at FLUXGATE_REDIS_URL (default 127.0.0.1:6379), installing
# Debian's redis-server first if it is missing. Job records live in Redis: it runs with append-only
# persistence and noeviction (an evicting Redis silently loses jobs).
set -euo pipefail
python=${1:-python3}
url=${FLUXGATE_REDIS_URL:-redis://127.0.0.1:6379/0}
ping() { "$python" -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_timeout=2).ping()" "$url" 2>/dev/null; }
# The binary is needed even when a Redis already answers: the test suite starts private servers.
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server (Debian package)" >&2
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq redis-server >/dev/null
fi
if ping; then exit 0; fi
port=$("$python" -c "import sys; from urllib.parse import urlparse; print(urlparse(sys.argv[1]).port or 6379)" "$url")
dir="${FLUXGATE_DATA_DIR:-.fluxgate}/redis"
mkdir -p "$dir"
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$(cd "$dir" && pwd)" \
  --appendonly yes --appendfsync everysec --maxmemory-policy noeviction --logfile redis.log
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "redis did not start on port $port" >&2
exit 1
