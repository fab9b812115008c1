# Fluxgate: `make run` starts the whole service locally; `make test` runs every check and test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (on this project's machines it comes from local disk); an unpinned torch pulls
# a multi-GB CUDA build. On a GPU machine: make TORCH=torch==2.13.0 run (or any CUDA build you have).
TORCH ?= torch==2.13.0
export FLUXGATE_REDIS_URL ?= redis://127.0.0.1:6379/0
# `make test` runs the suite in this many pytest-xdist processes, a test file to each (2: the CI machines'
# cores; the suite saturates them). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: run test lint typecheck unit integration venv redis clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[worker,dev]"
	touch $@

venv: $(VENV)/.installed

redis: venv
	deploy/ensure-redis.sh $(BIN)/python

run: venv redis
	PATH="$(abspath $(BIN)):$$PATH" deploy/run-local.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy api shared worker bench

unit: venv redis
	$(BIN)/python -m pytest -m "not integration" -q

integration: venv redis
	$(BIN)/python -m pytest -m integration -q

# The type check runs beside the suite (its one core would otherwise idle the other for ~70 s); its report
# follows the suite's, and either failing fails the target.
test: lint redis
	@typed=$$(mktemp); $(BIN)/mypy api shared worker bench >"$$typed" 2>&1 & mypy=$$!; \
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile; tests=$$?; \
	wait $$mypy; types=$$?; echo "mypy api shared worker bench:"; cat "$$typed"; rm -f "$$typed"; \
	[ $$tests -eq 0 ] && [ $$types -eq 0 ]

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
