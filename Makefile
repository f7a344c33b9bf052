# The README's two commands: `make demo` (set up, run the main job) and `make test` (set up, run the suite).
# Both create .venv on first use. With no torch in it, torch $(TORCH_VERSION) is installed first (the CPU
# build on a CPU machine with Python 3.11); on a CUDA cluster install your CUDA torch into .venv beforehand and
# it is kept. Python 3.12 (megatron-core 0.19.x): `make test PYTHON=python3.12 VENV=.venv-py312`.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# Two pytest workers: much of the suite is process start-up and gloo ranks waiting on each other, so two keep a
# 2-core machine busy (the whole suite 8:54 instead of about 12 minutes there). PYTEST_WORKERS=0 runs it in one.
PYTEST_WORKERS ?= 2
BIN := $(VENV)/bin

.PHONY: demo test clean

demo: $(VENV)/.installed
	$(BIN)/megatron-refine demo

test: $(VENV)/.installed
	@$(BIN)/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: the suite is missing" >&2; fi; \
	exit $$rc

$(VENV)/.installed: pyproject.toml setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e ".[test]"
	@touch $@

clean:
	rm -rf $(VENV) demo_output build *.egg-info
