#!/usr/bin/env bash
# GPU check: one command for a machine with an NVIDIA GPU and no internet (see bench/gpu_check.py for the stages).
#   bash bench/gpu_check.sh                                  # tiny random model: plumbing only
#   bash bench/gpu_check.sh --wheels .whl/ --model /models/SmolLM2-135M-Instruct
#   bash bench/gpu_check.sh --dry-run                        # what would be installed, run and skipped
# --wheels DIR installs the wheels (and sdists) in DIR, e.g. trl, deepspeed and their small dependencies, from that
# folder alone (pip --no-index): nothing is fetched. pyspark and vllm are too big to ship: their stages are skipped
# unless the machine has them. Every other argument goes to bench/gpu_check.py; PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS=""
DRY=""
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --dry-run) DRY=1; ARGS+=("$1"); shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [[ -n "$WHEELS" ]]; then
  shopt -s nullglob
  files=("$WHEELS"/*.whl "$WHEELS"/*.tar.gz)
  if [[ ${#files[@]} -eq 0 ]]; then
    echo "gpu_check: no .whl or .tar.gz in $WHEELS: nothing to install"
  elif [[ -n "$DRY" ]]; then
    echo "gpu_check: would install from $WHEELS: ${files[*]##*/}"
  # One pip call, so dependencies among the files resolve; --no-build-isolation builds an sdist with what is here.
  elif ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation "${files[@]}"; then
    echo "gpu_check: installing from $WHEELS failed (above); the stages that need those packages will say skipped"
  fi
fi

exec "$PY" bench/gpu_check.py ${ARGS[@]+"${ARGS[@]}"}
