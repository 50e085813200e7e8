# The two commands a newcomer needs (README): `make demo` and `make test`.
# Each sets itself up on a fresh machine: .venv, torch first (TORCH_SPEC), then this package.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.phased-dmd-installed
PYTEST_ARGS ?=

.PHONY: demo demo-full demo-teacher test test-fast lint setup clean-venv gpu-wheels

setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[test]"
	@touch $@

# The linter and the format check (settings in pyproject.toml), then the whole suite, slow
# multi-process tests included (what CI runs).
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Day-to-day loop: everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The tiny end-to-end distillation on CPU: 2 gloo processes at tensor parallel 2 (a few minutes).
DEMO := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node 2 examples/tiny_demo.py --config examples/configs/tiny_cpu.yaml
demo: $(STAMP)
	$(DEMO)

# The demo with its teacher's pretraining (2000 flow-matching steps, about 4 minutes on 2 cores)
# instead of the teacher kept in examples/demo_teacher/; and the command that writes that one.
demo-full: $(STAMP)
	$(DEMO) --pretrain

demo-teacher: $(STAMP)
	$(DEMO) --pretrain --teacher-only --save-teacher examples/demo_teacher

clean-venv:
	rm -rf $(VENV)

# Wheels for `python bench/gpu_check.py --wheels DIR` on a bare, air-gapped CUDA machine whose
# python3.12 (x86_64) has torch, triton, transformers, numpy and the usual packages but none of
# these. Binary ones for that interpreter, not this one; each pinned, one version of each.
# megatron-core and diffusers import nothing else the machine lacks; DeepSpeed needs hjson and
# pydantic 2 (pydantic-core, annotated-types, typing-inspection, and typing-extensions >= 4.16,
# which may be newer than the machine's). DeepSpeed is an sdist only: built here without its ops.
GPU_WHEELS ?= .gpu-wheels
GPU_WHEELS_MAX_MIB ?= 60
GPU_WHEEL_TARGET := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
GPU_WHEEL_PINS := megatron-core==0.16.1 diffusers==0.42.1 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
GPU_WHEEL_NAMES := $(foreach pin,$(GPU_WHEEL_PINS),$(firstword $(subst ==, ,$(pin)))) deepspeed phased-dmd-mega

# Order-only on the venv: an older stamp must not reinstall it here.
gpu-wheels: | $(STAMP)
	@mkdir -p $(GPU_WHEELS) && rm -f $(GPU_WHEELS)/*.whl
	$(PY) -m pip download -q --no-deps $(GPU_WHEEL_TARGET) -d $(GPU_WHEELS) $(GPU_WHEEL_PINS)
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) deepspeed==0.19.8
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) .
	$(PY) tools/check_gpu_wheels.py $(GPU_WHEELS) --max-mib $(GPU_WHEELS_MAX_MIB) \
		--expect $(GPU_WHEEL_NAMES) --pure deepspeed phased-dmd-mega
