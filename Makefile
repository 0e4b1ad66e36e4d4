# dig-jax: the two commands a new user needs (see README.md).
#   make demo   trains the embedded default (real MNIST digits shipped in a pip wheel) on this machine
#   make test   runs the test suite (what CI runs, via .ci/run)
# Both create .venv with the pinned stack on first use. jax 0.11 needs Python >= 3.12.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# First Python >= 3.12 on PATH (pyenv users: the committed .python-version selects 3.12.1), else one that pyenv
# installed but that is not on PATH.
PYTHON ?= $(shell for p in python3 python3.14 python3.13 python3.12 $(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python3); do \
  if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; \
  then echo $$p; break; fi; done)
WORKDIR ?= workdir/demo

.PHONY: demo test sample install clean-venv bench-gla bench-models bench-demo

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@if [ -z "$(PYTHON)" ]; then echo "dig-jax needs Python >= 3.12 (jax 0.11.2 requires it); install one, or pass PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@echo "Creating $(VENV) with $$($(PYTHON) -V) and the pinned stack (about a minute)..."
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m dig_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

sample: $(VENV)/.installed
	$(PY) -m dig_jax.sample --workdir=$(WORKDIR) --num_samples=64

# pytest exits 5 when it collects nothing: say so instead of failing silently or passing quietly.
# TEST_WORKERS test processes (pytest-xdist; 2 for CI's 2 cores; each holds its own JAX with 8 fake devices,
# so more workers need more memory; 0: one process). --dist loadgroup keeps each module with a costly module
# fixture (test_train, test_sample, test_convert: xdist_group marks) in one worker, which computes it once.
# --timeout-method=thread: a hung test fails, dumping every thread's stack (SIGALRM's can get swallowed).
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	@set +e; $(PY) -m pytest tests -q --timeout=900 --timeout-method=thread -n $(TEST_WORKERS) \
	  --dist loadgroup; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

bench-gla: $(VENV)/.installed
	$(PY) -m benchmarks.gla_kernel

bench-models: $(VENV)/.installed
	$(PY) -m benchmarks.model_sweep

bench-demo: $(VENV)/.installed
	$(PY) -m benchmarks.demo_quality

clean-venv:
	rm -rf $(VENV)
