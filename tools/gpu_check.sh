#!/usr/bin/env bash
# The one prepared GPU run (see tools/gpu_check.py for the steps and the JSON it writes to $OUT).
#   On the lent GPU machine, carrying .whl (made here by `make gpu-wheels`):
#       bash tools/gpu_check.sh [--budget SECONDS]
#   Here and in CI, the same steps on the CPU with tiny sizes:
#       bash tools/gpu_check.sh --dry-run [--strict]
set -uo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" --dry-run "*)
    PY=${GPU_CHECK_PYTHON:-.venv/bin/python} ;;
  *)
    PY=${GPU_CHECK_PYTHON:-python3}
    if [ ! -f .whl/MANIFEST.json ]; then
      echo "gpu_check: no .whl/MANIFEST.json: run 'make gpu-wheels' here and carry .whl" >&2
      exit 1
    fi
    # The machine has torch, transformers, numpy…; the project's other needs travel as wheels (tools/gpu_wheels.py).
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/keye_site .whl/*.whl \
      || echo "gpu_check: installing the carried wheels failed; the steps below show what is missing" >&2
    export PYTHONPATH=/tmp/keye_site${PYTHONPATH:+:$PYTHONPATH} ;;
esac
exec "$PY" tools/gpu_check.py "$@"
