# Kapok's two commands: `make run` (set up and run the main job) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

# no telemetry, ever (also set by `import kapok`)
export FEAST_USAGE := False
export BENTOML_DO_NOT_TRACK := True
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install run test lint format lock bench bench-smoke clean

# A fresh .venv with the exact versions of requirements.lock, then Kapok itself (editable).
$(BIN)/kapok: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

install: $(BIN)/kapok

## make run: simulate the region (100,000 enterprises x 36 months), build features, feast apply,
## materialize into the SQLite online store, train and register one model per product, then serve
## the lending API on port 3000 in demo mode (no API keys). Everything lands under KAPOK_HOME.
run: install
	$(BIN)/kapok run
	$(BIN)/kapok serve --demo --port 3000

## make test: lint, then every test (unit, point-in-time, Feast on SQLite and Redis, notebook).
test: install lint
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## make lock: re-pin every dependency after changing pyproject.toml
lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra bench --python-version 3.11 -o requirements.lock

## make bench: the simulator's time and memory at 100,000 enterprises, the simulator's realism, and
## Kapok's quality against the scorecards (about an hour), and `kapok watch` on a book of 1,000,000
## enterprises against a 100,000 baseline (by hand, never in CI)
bench: install
	$(BIN)/python bench/simulator.py --enterprises 100000 --baseline 20000 --features
	$(BIN)/python bench/realism.py --enterprises 100000
	$(BIN)/python bench/quality.py --home /tmp/kapok-quality --prepare 100000 --trials 50
	$(BIN)/python bench/watch.py --baseline 100000 --enterprises 1000000 --work /tmp/kapok-watch

## make bench-smoke: every performance benchmark once at a tiny size on a small trained home
## (3,000 enterprises, a few minutes), so that the benchmarks keep working; CI runs it. Figures
## from it mean nothing: run the benchmarks by hand at full size (bench/RESULTS.md).
SMOKE_HOME ?= /tmp/kapok-bench-smoke
bench-smoke: install
	rm -rf $(SMOKE_HOME)
	KAPOK_HOME=$(SMOKE_HOME) $(BIN)/kapok run --enterprises 3000 --trials 2 --timeout 30
	KAPOK_HOME=$(SMOKE_HOME) $(BIN)/python bench/batch.py --home $(SMOKE_HOME) --quick
	$(BIN)/python bench/tuning.py --home $(SMOKE_HOME) --quick --cache $(SMOKE_HOME)/tuning-cache
	KAPOK_HOME=$(SMOKE_HOME) $(BIN)/python bench/online_read.py --reps 1
	$(BIN)/python bench/features_build.py --raw $(SMOKE_HOME)/data/raw
	KAPOK_HOME=$(SMOKE_HOME) $(BIN)/python bench/backfill.py --home $(SMOKE_HOME) --naive-rows 50
	$(BIN)/python bench/decision_log.py --threads 4 --each 20
	$(BIN)/python bench/serving.py --home $(SMOKE_HOME) --quick
	$(BIN)/python bench/soak.py --home $(SMOKE_HOME) --rate 20 --minutes 0.5 --warm 1 --smoke
	$(BIN)/python bench/crash.py --home $(SMOKE_HOME) --reps 2 --min-load 1 --max-load 3
	$(BIN)/python bench/pit.py --home $(SMOKE_HOME) --products microloan
	$(BIN)/python bench/scaling.py --home $(SMOKE_HOME) --quick
	rm -rf $(SMOKE_HOME)

clean:
	rm -rf data feature_repo/data feature_repo/feature_store.yaml
