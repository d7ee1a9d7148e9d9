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
RECIPE ?=
# The demo's seed set exercises every retrieval policy on the demo corpus's seed images.
DEMO_POLICY ?= as-is+knn:4+cluster:25+balanced:200

PORT ?= 8765

TRAIN_DIR ?= $(CURATE_DATA_ROOT)/train-demo
TRAIN_STEPS ?= 400
TRAIN_MINUTES ?= 9

.PHONY: curate demo serve train test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[dev]'
	touch $@

# The demo's copy model: trained on the demo crawl for COPY_MINUTES (a couple of minutes on a
# 2-core CPU), cached under COPY_MODELS by the crawl's content and the settings, so a second
# `make curate` reuses it. The eval set is edited copies of a few crawl originals, so that all
# four dedup passes (exact, hash, copies, eval-set copies) have something to find.
COPY_MODELS ?= $(CURATE_DATA_ROOT)/copy-models
COPY_MINUTES ?= 2
DEMO_COPY_WEIGHTS := $(COPY_MODELS)/demo.safetensors

curate: $(STAMP)
ifeq ($(SOURCE),)
	$(BIN)/curate demo $(DEMO_DIR)
	$(BIN)/curate seeds add demo $(DEMO_DIR)/seeds/demo --policy $(DEMO_POLICY)
	$(BIN)/curate copy-model demo-eval $(DEMO_DIR) $(DEMO_DIR)/eval
	$(BIN)/curate eval-sets add demo-eval $(DEMO_DIR)/eval
	$(BIN)/curate copy-model train $(DEMO_DIR)/crawl --out $(COPY_MODELS) \
		--minutes $(COPY_MINUTES) --export $(DEMO_COPY_WEIGHTS)
	CURATE_COPY_WEIGHTS=$(DEMO_COPY_WEIGHTS) $(BIN)/curate run --recipe $(or $(RECIPE),demo) \
		--source $(DEMO_DIR)/crawl --seeds $(or $(SEEDS),demo) --eval-sets demo-eval \
		--job $(or $(JOB),demo)
else
	$(BIN)/curate run --source '$(SOURCE)' $(if $(SEEDS),--seeds $(SEEDS)) \
		$(if $(RECIPE),--recipe $(RECIPE)) $(if $(JOB),--job $(JOB))
endif

demo: $(STAMP)
	$(BIN)/curate demo $(DEMO_DIR)

# The REST service and web UI on the demo job: the demo job is run first unless it is done, the
# local write token (made once, kept 0600 beside the catalog, remade if revoked) is printed, and
# the service may read the demo corpus (a second job from the UI form).
serve: $(STAMP)
	$(BIN)/curate demo $(DEMO_DIR)
	$(BIN)/curate seeds add demo $(DEMO_DIR)/seeds/demo --policy $(DEMO_POLICY)
	$(BIN)/curate jobs show demo --json 2>/dev/null | grep -q '"status": "done"' || \
		$(BIN)/curate run --recipe demo --source $(DEMO_DIR)/crawl --seeds demo --job demo
	@token=$$($(BIN)/curate tokens local --scope write --name "make serve") && \
		echo && echo "  open  http://127.0.0.1:$(PORT)/  and sign in with the write token" && \
		echo "  token $$token" && echo
	CURATE_SOURCE_ROOTS=$(DEMO_DIR) $(BIN)/curate serve --port $(PORT)

# The trainer on the demo corpus's labelled originals, with k-NN accuracy along the way: a ViT-Ti
# for a bounded time on CPU (torchrun -m services.cli.train ... for several processes or GPUs).
train: $(STAMP)
	$(BIN)/curate demo $(DEMO_DIR)
	$(BIN)/curate train demo-data $(DEMO_DIR) $(TRAIN_DIR)/data
	rm -rf $(TRAIN_DIR)/run
	$(BIN)/curate train run --data $(TRAIN_DIR)/data/shards --out $(TRAIN_DIR)/run \
		--preset small --arch vit_tiny_patch16_224 --steps $(TRAIN_STEPS) \
		--time-limit $(TRAIN_MINUTES) --knn-folder $(TRAIN_DIR)/data/knn

test: $(STAMP)
	$(BIN)/python -m pytest

# The unit tests alone (tests/unit/): no Ray, no servers, no subprocesses; well under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration" tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# copybench trains its copy model for 30 minutes the first time (cached under bench/work/).
bench: $(STAMP)
	$(BIN)/python bench/copybench/run.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/dedup.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/index.py
	$(BIN)/python bench/index_shards.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/projection.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/service.py

clean:
	rm -rf $(VENV) .pytest_cache
