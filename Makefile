# Set-up is part of every target: each creates or reuses .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: test lint typecheck pytest demo bench docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) $(TORCH_PIN)
	$(PIP) -e ".[dev,demo]" $(TORCH_PIN)
	touch $@

lint: $(VENV)/.dev-installed
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

typecheck: $(VENV)/.dev-installed
	$(PY) -m mypy

pytest: $(VENV)/.dev-installed
	$(PY) -m pytest -n auto

test: lint typecheck pytest

demo: $(VENV)/.dev-installed
	$(VENV)/bin/sumto demo --out demo-out

bench: $(VENV)/.dev-installed
	$(PY) benchmarks/run.py --out bench-out

# The site goes to site/; strict: any warning (a broken link, a bad docstring) fails.
docs: $(VENV)/.dev-installed
	$(PIP) -e ".[docs]" $(TORCH_PIN)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) dist build site .pytest_cache .mypy_cache .ruff_cache .hypothesis
