# Courier's verbs. `make run` and `make test` do all the set-up they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUN_STAMP := $(VENV)/.run-stamp
COURIER_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
export COURIER_AMQP_URL
# The tests start over a hundred Python processes; without bytecode caches each one
# compiles the project from source again (half a second for the CLI's imports, several
# seconds of pytest's assertion rewriting per worker). The caches go to __pycache__/.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install run broker tools lint format test durations flake soak schemas clean demo bench bench-tenants chaos node-deps

define check_python
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Courier needs Python 3.11 or newer (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
endef

# uv installs the same versions as pip in a tenth of the time (5 s, not 45 s, here);
# pip does it when uv cannot be had.
define install_packages
	$(BIN)/python -m pip install --quiet 'uv>=0.5,<1' && \
		$(BIN)/uv pip install --python $(BIN)/python --native-tls --quiet $(1) || \
		{ echo "uv failed; installing with pip"; $(BIN)/python -m pip install --quiet $(1); }
endef

# Everything: the service, its tests and tools.
$(STAMP): pyproject.toml
	$(check_python)
	$(call install_packages,-e '.[dev]')
	touch $(STAMP) $(RUN_STAMP)

# Only what the service itself needs (`make run`).
$(RUN_STAMP): pyproject.toml
	$(check_python)
	$(call install_packages,-e .)
	touch $(RUN_STAMP)

install: $(STAMP)

# `courier run`; with no destination key set, against the local fakes (scripts/run.py).
# Logs for people on a terminal, JSON lines otherwise (or as COURIER_LOG_FORMAT says).
run: $(RUN_STAMP)
	@COURIER_LOG_FORMAT=$${COURIER_LOG_FORMAT:-$$(if [ -t 2 ]; then echo console; else echo json; fi)} \
		$(BIN)/python -m scripts.run

# The Node.js AMQP client of the producer snippets (tests/producers), when Node is there.
node-deps:
	@if command -v npm >/dev/null 2>&1; then \
		cd examples/producers/node && npm ci --no-audit --no-fund --silent; \
	else echo "node-deps: npm not found; the Node.js producer tests will be skipped"; fi

broker:
	@scripts/ensure-rabbitmq.sh "$(COURIER_AMQP_URL)"

tools:
	@scripts/ensure-promtool.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Three tiers (pyproject.toml's markers; README, Development). The default tier is
# deterministic: it waits on conditions, never on durations, so it runs in parallel
# (four workers, each test file on one: most tests wait on the broker, the fakes or
# a fault's timeline, so they overlap well even on two cores). The `timing` tier holds
# wall-clock bounds: it runs afterwards, one test at a time, on a quiet RabbitMQ node
# of its own. The `soak` tier (statistical probes, long chaos) is `make soak`'s.
PYTEST_WORKERS ?= 4
DEFAULT_TIER := not timing and not soak

# Workers take the longest files first (testbed/schedule.py; `make durations` measures
# them again), so they finish together.
DEFAULT_RUN := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "$(DEFAULT_TIER)"

test: install broker tools node-deps lint
	$(BIN)/pytest $(DEFAULT_RUN)
	$(BIN)/pytest -p no:xdist -m timing

durations: install broker tools node-deps
	$(BIN)/pytest $(DEFAULT_RUN) --store-durations

# The blocking tiers N times under CPU stress, with shuffled workers and distribution;
# then a report per test (failures, messages, durations, timing margins).
#   make flake N=20                       make flake N=2 TESTS=tests/broker/test_settle.py
# The soak tier N times, one probe at a time, with each probe's failure rate:
#   make soak N=50                        make soak N=5 TESTS=tests/broker/test_gate.py
N ?= 10
TESTS ?= tests
STRESS ?= 0.6
FLAKE_ARGS ?=

flake: install broker node-deps
	$(BIN)/python -m scripts.flake --runs $(N) --stress $(STRESS) $(FLAKE_ARGS) $(TESTS)

soak: install broker
	$(BIN)/python -m scripts.flake --tier soak --runs $(N) --stress $(STRESS) $(FLAKE_ARGS) $(TESTS)

schemas: install
	$(BIN)/python -m tests.regen_schemas

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .flake .soak

demo: install broker
	$(BIN)/python -m scripts.demo

bench: install broker
	$(BIN)/python -m bench.run

bench-tenants: install broker
	$(BIN)/python -m bench.tenants

chaos: install broker
	$(BIN)/python -m bench.chaos
