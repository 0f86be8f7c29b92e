# The README's commands. Each target creates .venv when missing and installs with constraints.txt,
# so a fresh machine with only Python 3.11 and the package registries can run any of them.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
# Local Ray requires its token (marn.ray_runtime: a 0600 file made once per user, created before Ray starts),
# so a test that joins a `marn serve up` cluster with ray.init(address=...) authenticates too.
export RAY_AUTH_MODE := token
export RAY_AUTH_TOKEN_PATH := $(or $(XDG_STATE_HOME),$(HOME)/.local/state)/marn/ray_auth_token
RAY_TOKEN := $(BIN)/python -c "from marn.ray_runtime import local_token_path; local_token_path()"

.DEFAULT_GOAL := help
.PHONY: help install demo test test-unit test-slow bench paper paper-report lint format constraints clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency files change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python -m pip check
	@touch $@

install: $(STAMP)  ## create .venv and install pinned dependencies

demo: $(STAMP)  ## the main job on the embedded synthetic default
	$(BIN)/marn demo --config configs/local.yaml

test: $(STAMP)  ## unit + integration tests (integration tests are marked slow; Redis ones need redis-server)
	$(RAY_TOKEN)
	$(BIN)/python -m pytest tests

test-unit: $(STAMP)  ## fast unit tests only
	$(RAY_TOKEN)
	$(BIN)/python -m pytest tests/unit -m "not slow"

bench: $(STAMP)  ## model speed table (train samples/s, inference latency) incl. DeepCTR-Torch's DIN
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.model_speed --threads 1 --json benchmarks/results/model-speed.json

# The paper's experiments read the research data from ../shared (never copied here); work goes to PAPER_WORK.
SHARED     ?= ../shared
PAPER_WORK ?= .marn/paper
# Finished runs are kept here, committed, so the grid goes on across machines (benchmarks/ledger.py);
# PAPER_LEDGER= (empty) trains everything from scratch and keeps nothing.
PAPER_LEDGER ?= benchmarks/results/paper-movielens-runs
# Minutes the machine is yours for (empty: no limit): no run starts that is not expected to end within them.
PAPER_BUDGET_MIN ?=
paper: $(STAMP)  ## Tables 2-5, Figures 4-6 on ../shared MovieLens (hours on 2 cores; resumable)
	@test -d $(SHARED)/datasets/movielens-100k || { echo "no $(SHARED)/datasets/movielens-100k (SHARED=...)"; exit 1; }
	test -f $(PAPER_WORK)/data/events.parquet || $(BIN)/marn data import movielens \
		--src $(SHARED)/datasets/movielens-100k --media $(SHARED)/datasets/movielens-100k-media --out $(PAPER_WORK)/data
	test -f $(PAPER_WORK)/data/image_embeddings.parquet || $(BIN)/marn embed --data $(PAPER_WORK)/data \
		--weights $(SHARED)/models/mobilenet_v2-b0353104.pth --config configs/paper-movielens.yaml
	@# exit status 3: the budget left runs for the next `make paper`; the report waits for the whole grid
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.paper run --data $(PAPER_WORK)/data --work $(PAPER_WORK) \
		$(if $(PAPER_LEDGER),--ledger $(PAPER_LEDGER)) $(if $(PAPER_BUDGET_MIN),--budget-min $(PAPER_BUDGET_MIN)) \
		&& $(MAKE) paper-report || test $$? -eq 3

paper-report: $(STAMP)  ## rewrite benchmarks/results/paper-movielens.{md,json} and figures from finished runs
	$(BIN)/python -m benchmarks.paper report --data $(PAPER_WORK)/data --work $(PAPER_WORK)

lint: $(STAMP)  ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

constraints: $(STAMP)  ## regenerate constraints.txt from the installed set
	@{ head -2 constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.new
	mv constraints.new constraints.txt

clean:  ## remove local outputs (keeps .venv)
	rm -rf .marn .pytest_cache .ruff_cache
