# taskmllm — set-up and checks. `make test` and `make demo` work on a fresh machine with Python 3.11 + pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The tested torch pair (pyproject keeps open ranges); pip takes it from local disk on the project's machines.
TORCH  := torch==2.14.1 torchvision==0.29.1
EXTRAS := dev,train

.PHONY: install test test-slow test-e2e bench demo clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

test: install  ## the default suite (CPU, tiny models, no downloads)
	$(BIN)/python -m pytest -q

test-slow: install  ## long checks: training runs, real-size runs
	$(BIN)/python -m pytest -q -m slow

test-e2e: install  ## browser end-to-end tests (needs Debian's chromium)
	$(BIN)/python -m pytest -q -m e2e

bench: install  ## benchmarks; each writes JSON to bench/results/
	mkdir -p bench/results
	$(BIN)/python bench/generate.py --out bench/results/generate.json
	$(BIN)/python bench/pipeline.py --out bench/results/pipeline.json
	$(BIN)/python bench/interventions.py > bench/results/interventions.json
	$(BIN)/python bench/data.py > bench/results/data.json

demo: install  ## until the Gradio demo exists: a ShapesWorld preview and a generation on the tiny model
	$(BIN)/taskmllm data preview --n 16 --out demo-preview.png

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
