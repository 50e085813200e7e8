# The two commands a newcomer needs (README): `make demo` and `make test`.
# Each sets itself up on a fresh machine: .venv, torch first (TORCH_SPEC), then this package.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.phased-dmd-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast setup clean-venv

setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[test]"
	@touch $@

# The whole suite, slow multi-process tests included (what CI runs).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Day-to-day loop: everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The tiny end-to-end distillation on CPU: 2 gloo processes at tensor parallel 2 (a few minutes).
demo: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 examples/tiny_demo.py --config examples/configs/tiny_cpu.yaml

clean-venv:
	rm -rf $(VENV)
