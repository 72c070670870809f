# Set-up is idempotent: the first target that needs the environment creates .venv and installs the
# project into it; later runs reuse it (the stamp is refreshed when pyproject.toml changes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= engines/demo

.PHONY: setup demo test clean gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build that lies on this machine's disk (an open range could pull a CUDA build).
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[reference,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/helios-deploy demo -o $(DEMO_DIR)

test: $(STAMP) browser postgresql
	$(BIN)/python -m pytest -q --durations=15 tests

# Debian's chromium for the API page test (tests/test_api_page.py drives it headless). Installed when missing
# and running as root (CI); a developer without root gets that test skipped with the reason, not a failure.
.PHONY: browser
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "chromium is missing and this is not root: tests/test_api_page.py will be skipped"; fi

# Debian's PostgreSQL server for the job-store tests (tests/pg_fixture.py starts one per session with initdb and
# pg_ctl as the postgres user). Installed when missing and running as root (CI); without it those tests are skipped.
.PHONY: postgresql
postgresql:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	else echo "postgresql is missing and this is not root: the PostgreSQL job-store tests will be skipped"; fi

clean:
	rm -rf $(VENV) engines/demo

# GPU smoke run (one NVIDIA GPU, TensorRT >= 10.1 installed in .venv: pip install 'tensorrt>=10.1'): tiny checkpoint,
# export, tiny engines, the gpu-marked tests, `verify`, then the checks only a GPU settles (export/tensorrt/gpuchecks.py:
# refit in three groups, refittable profiles, FP8 scale refit, TF32); one JSON of results, what to do with each answer
# in docs/tensorrt.md. Without a GPU or TensorRT it stops at once with one message (exit 1).
GPU_CHECK_OUT ?= gpu-check.json
gpu-check: $(STAMP)
	$(BIN)/python -m helios_deploy.export.tensorrt.gpucheck -o $(GPU_CHECK_OUT)

# The Triton server environment (helios_deploy/serving, tests/test_triton.py): tritonserver from the
# nvidia-pytriton wheel runs the `helios` Python-backend model, whose stub needs numpy<2 (PLATFORM.md),
# so it gets its own venv instead of pinning the project's numpy. torch first, pinned (CPU build on
# local disk); then pytriton, numpy<2 and helios-deploy itself (runtime dependencies only). The last
# step copies the Python backend stub into pytriton's backends/python folder (idempotent) and checks
# that onnxruntime, tokenizers and torch import under numpy<2.
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

.PHONY: triton-env clean-triton

triton-env: $(TRITON_STAMP)

$(TRITON_STAMP): pyproject.toml
	test -x $(TRITON_VENV)/bin/python || $(PY) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install --quiet "torch==2.13.0"
	$(TRITON_VENV)/bin/python -m pip install --quiet "torch==2.13.0" "nvidia-pytriton==0.7.0" "numpy<2" -e .
	$(TRITON_VENV)/bin/python -m helios_deploy.serving.server prepare
	touch $(TRITON_STAMP)

test: $(TRITON_STAMP)

clean: clean-triton

clean-triton:
	rm -rf $(TRITON_VENV)
