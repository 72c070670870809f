# Set-up is idempotent: the first target that needs the environment creates .venv and installs the
# project into it; later runs reuse it (the stamp is refreshed when pyproject.toml changes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= engines/demo

.PHONY: setup demo test clean

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

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) engines/demo
