# Two entry points (see README): `make pipeline` and `make test`.
# Both create the locked environment in .venv when it is missing or stale.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= tiny

.PHONY: env pipeline test lint lock clean-env

env: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml scripts/ensure_env.sh
	bash scripts/ensure_env.sh $(VENV)

pipeline: env
	$(VENV)/bin/ddcore pipeline --preset $(PRESET)

test: env
	$(VENV)/bin/ruff check ddcore flows tests
	$(VENV)/bin/ruff format --check ddcore flows tests
	$(PY) -m pytest

lint: env
	$(VENV)/bin/ruff check --fix ddcore flows tests && $(VENV)/bin/ruff format ddcore flows tests

lock:
	uv pip compile requirements.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --no-emit-index-url --no-emit-find-links --no-header --no-annotate -o requirements.lock

clean-env:
	rm -rf $(VENV)
