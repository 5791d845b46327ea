#!/usr/bin/env bash
# Create the side venv .venv-sglang with SGLang, for the conformance tests in tests/sglang that run
# SGLang's own draft loaders on our exported folders. SGLang pins a CUDA torch and its own
# transformers, so it cannot share .venv (CPU torch). Idempotent: a second run only re-checks.
# On a CPU machine sgl_kernel still links libcuda.so.1: we build a stub (scripts/sglang/stub_libcuda.c)
# into $VENV/lib/stub/; put that folder on LD_LIBRARY_PATH when importing sglang.srt.
# Cost (measured): ~11 GB on disk, ~1.6 GB downloaded, a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SGLANG_VENV:-.venv-sglang}
SGLANG_VERSION=${SGLANG_VERSION:-0.5.23}
STUB_SRC=scripts/sglang/stub_libcuda.c
STUB_DIR="$VENV/lib/stub"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# The project's CPU-torch pin (constraints.txt) must not reach this venv: SGLang pins its own torch.
unset PIP_CONSTRAINT
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp="$VENV/.specforge-sglang-installed"
want="$(printf '%s\n' "$SGLANG_VERSION" | cat - "$0" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q "sglang==$SGLANG_VERSION" safetensors numpy
  echo "$want" > "$stamp"
fi

if ! command -v "${CC:-gcc}" >/dev/null && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev) >/dev/null 2>&1 \
    || echo "warning: could not install gcc; the stub libcuda cannot be built" >&2
fi
if [ ! -f "$STUB_DIR/libcuda.so.1" ] || [ "$STUB_SRC" -nt "$STUB_DIR/libcuda.so.1" ]; then
  mkdir -p "$STUB_DIR"
  ${CC:-gcc} -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$STUB_DIR/libcuda.so.1" "$STUB_SRC"
  ln -sf libcuda.so.1 "$STUB_DIR/libcuda.so"
fi
