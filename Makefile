# Set-up is part of every target: each creates or reuses .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
# --no-compile: no .pyc for the thousands of files of torch up front (Python compiles what it imports).
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --no-compile
# Extra flags of the docs' browser check (CI passes --require: no skipping without Chromium).
BROWSER_CHECK_FLAGS ?=

.PHONY: test lint typecheck pytest demo bench docs docs-tools clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) $(TORCH_PIN)
	$(PIP) -e ".[dev,demo]" $(TORCH_PIN)
	touch $@

# What `make demo` needs and nothing more: the package and the demo extra.
$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PIP) $(TORCH_PIN)
	$(PIP) -e ".[demo]" $(TORCH_PIN)
	touch $@

$(VENV)/.docs-installed: pyproject.toml | $(PY)
	$(PIP) $(TORCH_PIN)
	$(PIP) -e ".[docs]" $(TORCH_PIN)
	touch $@

lint: $(VENV)/.dev-installed
	$(PY) -m ruff check src tests benchmarks examples docs/_tooling
	$(PY) -m ruff format --check src tests benchmarks examples docs/_tooling

typecheck: $(VENV)/.dev-installed
	$(PY) -m mypy

# worksteal: an idle worker takes queued tests from a busy one, so a few long tests
# (compilation, multi-process) do not leave one core waiting at the end.
pytest: $(VENV)/.dev-installed
	$(PY) -m pytest -n auto --dist worksteal

# The type check (one core, about 25 s cold) runs beside the tests instead of before them.
test: lint
	$(MAKE) --no-print-directory -j2 typecheck pytest

demo: $(VENV)/.demo-installed
	$(VENV)/bin/sumto demo --out demo-out

bench: $(VENV)/.dev-installed
	$(PY) benchmarks/run.py --out bench-out

# $(call apt_install,COMMAND,PACKAGE): apt-get install PACKAGE when COMMAND is missing and
# this is root on a Debian-like system; otherwise say so and go on.
apt_install = command -v $(1) >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] \
	&& command -v apt-get >/dev/null 2>&1 && echo "installing $(2) with apt-get" \
	&& { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null 2>&1 \
	|| { apt-get update -qq >/dev/null 2>&1 \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null 2>&1; }; }; } \
	|| echo "could not install $(2) with apt-get: $(1) is missing"

# npm fetches the pinned KaTeX that renders the maths (docs/_tooling/katex_render.py);
# Chromium runs the browser check.
docs-tools:
	@$(call apt_install,npm,npm)
	@$(call apt_install,chromium,chromium)

# The site goes to site/; strict: any warning (a broken link, a bad docstring, maths KaTeX
# cannot render) fails. Then headless Chromium opens every page offline and fails on a
# console error or TeX left on screen; it saves a screenshot of the home page.
docs: $(VENV)/.docs-installed docs-tools
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict
	$(PY) docs/_tooling/browser_check.py site --screenshot build/docs-check/home.png \
		$(BROWSER_CHECK_FLAGS)

clean:
	rm -rf $(VENV) dist build site .pytest_cache .mypy_cache .ruff_cache .hypothesis
