# Two entry points (see README): `make pipeline` and `make test`.
# Both create the locked environment in .venv when it is missing or stale.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= tiny

.PHONY: env pipeline test test-fast gpu-check notebooks lint lock clean-env

env: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml scripts/ensure_env.sh
	bash scripts/ensure_env.sh $(VENV)

pipeline: env
	$(VENV)/bin/ddcore pipeline --preset $(PRESET)

test: env
	$(VENV)/bin/ruff check ddcore flows tests scripts notebooks
	$(VENV)/bin/ruff format --check ddcore flows tests scripts notebooks
	$(PY) -m pytest

# everything but the end-to-end pipeline and server tests (marked slow); CI runs `make test`
test-fast: env
	$(VENV)/bin/ruff check ddcore flows tests scripts notebooks
	$(PY) -m pytest -m "not slow"

# on a machine with a CUDA GPU: metrics/gpu/bench.json; elsewhere it says so in one line
gpu-check: env
	$(PY) scripts/gpu_check.py

# the micro pipelines (DD1 and DD2, registered into the project's store), then the notebooks executed
# into notebooks/rendered/*.ipynb
notebooks: env
	$(VENV)/bin/ddcore pipeline --preset micro
	$(VENV)/bin/ddcore pipeline --preset micro-dd2
	$(PY) scripts/run_notebooks.py --root . --out notebooks/rendered

lint: env
	$(VENV)/bin/ruff check --fix ddcore flows tests scripts notebooks && $(VENV)/bin/ruff format ddcore flows tests scripts notebooks

lock:
	uv pip compile requirements.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --no-emit-index-url --no-emit-find-links --no-header --no-annotate -o requirements.lock

clean-env:
	rm -rf $(VENV)
