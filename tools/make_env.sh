#!/usr/bin/env bash
# Build a fresh virtual environment with the project installed in editable mode.
#   tools/make_env.sh VENV LOCKFILE   exact versions (with hashes) from a lock made by `make lock`
#   tools/make_env.sh VENV --newest   the newest releases that setup.py's ranges admit (no lock)
# An existing VENV is removed first, so nothing from an earlier install survives. pip itself is pinned here; torch
# comes from pip's cache / local wheels on these machines (uv would download a CUDA build of several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_VERSION=26.3
venv=${1:?usage: tools/make_env.sh VENV LOCKFILE|--newest}
source=${2:?usage: tools/make_env.sh VENV LOCKFILE|--newest}
PY=${PY:-python3}
rm -rf "$venv"
"$PY" -m venv "$venv"
pip=("$venv/bin/pip" --quiet --disable-pip-version-check)
"${pip[@]}" install "pip==$PIP_VERSION"
if [ "$source" = --newest ]; then
  "${pip[@]}" install --upgrade --upgrade-strategy eager -e ".[dev,demo]"
else
  "${pip[@]}" install --require-hashes -r "$source"
  # The lock holds setuptools (torch needs it): build the editable install with it, not a fresh download.
  "${pip[@]}" install --no-deps --no-build-isolation -e .
fi
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
print("installed:", ", ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "deepspeed", "tokenizers")))
PY
