# The two commands: `make run` (set up + run the default pipeline) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup run test lint bench clean

# The environment is rebuilt only when pyproject.toml or constraints.txt change. The service profile's intents
# ship in chatbot-nlu, installed without its own dependencies (a BERT server): reading them needs none.
$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || \
		{ echo "error: lmforge needs Python 3.11; $(PYTHON) is $$($(PYTHON) --version 2>&1) (make PYTHON=/path/to/python3.11)" >&2; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps chatbot-nlu==1.0.3
	touch $@

setup: $(VENV)/.installed

run: setup
	lmforge run

test: setup
	ruff check .
	mypy
	site="$$(mktemp -d)"; trap 'rm -rf "$$site"' EXIT; NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$$site"
	pytest

lint: setup
	ruff check .
	ruff format --check .

bench: setup
	python -m bench.train_speed
	python -m bench.allocator
	python -m bench.decoder_loss
	python -m bench.generate_speed
	python -m bench.startup
	python -m bench.preprocess_memory
	python -m bench.ingest_memory
	python -m bench.hpo_pruning
	python -m bench.dispatch
	python -m bench.serve_latency

clean:
	rm -rf data/raw data/processed reports models checkpoints
