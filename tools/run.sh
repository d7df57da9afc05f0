#!/usr/bin/env bash
# The two set-up commands of the README go through here: `bash tools/run.sh demo|test`.
# It installs what is missing and keeps an existing torch (a user's CUDA build stays);
# with no torch installed it takes the CPU wheel torch==2.13.0, never a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"
shift || true
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
case "$what" in
  test)
    "$PY" -m ruff check toprovar_fx tests benchmarks tools
    # two workers (pytest-xdist): the suite is mostly Dynamo compiles, single-threaded Python;
    # 13 against 23.5 minutes on CI's 2 cores (2026-11-30). TOPROVAR_TEST_WORKERS=0 runs it serially.
    "$PY" -m pytest -n "${TOPROVAR_TEST_WORKERS:-2}" "$@"
    ;;
  demo)
    "$PY" -m toprovar_fx.cli demo "$@"
    ;;
  *)
    echo "usage: bash tools/run.sh demo|test [args...]" >&2
    exit 2
    ;;
esac
