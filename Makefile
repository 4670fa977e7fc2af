# One command runs Sluice, one tests it.  Everything installs into ./.venv.
#   make dev     install, then start the whole stack (Ctrl-C stops it all)
#   make test    install, then run the whole test suite
#   make check   ruff (lint + format) and mypy --strict
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of PyTorch.  Elsewhere add: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: install dev test check clean

install: $(STAMP)

# tests/js: the real tus-js-client for tests/test_tus_js_client.py (and its browser build and
# Uppy's bundle for tests/test_tus_browser.py), installed where npm exists (without it those
# tests are skipped, saying how to install it).
$(STAMP): pyproject.toml tests/js/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix tests/js --no-audit --no-fund \
			|| echo "npm ci failed: tests/test_tus_js_client.py and test_tus_browser.py will be skipped"; \
	else \
		echo "npm not found: tests/test_tus_js_client.py and test_tus_browser.py will be skipped"; \
	fi
	touch $(STAMP)

dev: install
	HF_HUB_OFFLINE=1 $(BIN)/sluice dev

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

check: install
	$(BIN)/ruff check app workers devstack tests bench
	$(BIN)/ruff format --check app workers devstack tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
