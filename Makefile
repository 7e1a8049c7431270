# Two entry points: `make test` (install + full test suite) and `make demo` (install + 4-rank demo run).
# Both create .venv when it is missing. torch is pinned to 2.13.0 only when the venv has none: on this
# project's CPU machines that wheel lies on local disk, while a bare `torch` pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 4

.PHONY: test lint demo install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .

install-dev: install
	$(BIN)/pip install -q -e ".[dev]"

test: install-dev
	$(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check .

demo: install
	$(BIN)/pip install -q -e ".[train]"
	rm -f demo/metrics.jsonl
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m seqpar.launch.train --model llama-tiny \
		--data longtail --strategy auto --steps 20 --tokens-per-step 8192 --max-len 4096 \
		--metrics demo/metrics.jsonl --plot demo/loss.png

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
