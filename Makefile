# Every target bootstraps .venv on first use; only python3 (3.11+) and make are needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export CURATE_DATA_ROOT ?= $(CURDIR)/data
DEMO_DIR ?= $(CURATE_DATA_ROOT)/demo-corpus
SOURCE ?=
SEEDS ?=
JOB ?=

.PHONY: curate demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[dev]'
	touch $@

curate: $(STAMP)
ifneq ($(SEEDS),)
	$(error SEEDS: seed-set retrieval is not built yet; this version runs the ingest stage)
endif
ifeq ($(SOURCE),)
	$(BIN)/curate demo $(DEMO_DIR)
	$(BIN)/curate run --source $(DEMO_DIR)/crawl --job $(or $(JOB),demo)
else
	$(BIN)/curate run --source '$(SOURCE)' $(if $(JOB),--job $(JOB))
endif

demo: $(STAMP)
	$(BIN)/curate demo $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/dedup.py

clean:
	rm -rf $(VENV) .pytest_cache
