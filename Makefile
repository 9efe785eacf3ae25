# The two commands: `make conformance` and `make test`. Both set up what they need.
VENV := .venv
BIN := $(VENV)/bin
ARTIFACTS ?= artifacts
# A run starts hundreds of Python processes (agents, enforcer runs, workers, peers' scripts):
# with bytecode written once (__pycache__, ignored by git), none compiles its modules again,
# and pytest keeps its assertion rewrites. An environment that sets this to "1" would cost
# every process that: it is cleared for the commands below.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: setup conformance test unit lint clean bench

setup:
	@scripts/bootstrap

conformance: setup
	$(BIN)/pinhole conformance --json $(ARTIFACTS)/conformance.json --junit $(ARTIFACTS)/conformance.xml \
		--html $(ARTIFACTS)/conformance.html --artifacts $(ARTIFACTS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mypy examples

unit: setup
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

# Every test: lint, unit tests (no root), end-to-end tests, the clause suite and the
# self-check (every clause fails a trivial firewall: tests/e2e/test_self_check.py) (root): in
# parallel (WORKERS, by default what `pinhole conformance` takes: six a core; a module's checks
# of one topology, family and firewall go to one worker, which builds its own labs),
# then the timing-sensitive ones alone. Both parts run; either failing (no test collected
# included) fails.
WORKERS ?= $(shell $(BIN)/python -c "from testbed.conformance import default_workers; print(default_workers())")
PYTEST := $(BIN)/pytest -p no:cacheprovider -rfEs --pinhole-artifacts $(ARTIFACTS)
test: lint
	@status=0; \
	$(PYTEST) --durations=15 -n $(WORKERS) --dist loadgroup -m "not alone" tests testbed/clauses || status=$$?; \
	$(PYTEST) -m alone tests testbed/clauses || status=$$?; \
	exit $$status

# The performance goals (P1-P4) as ratios measured in one run; writes bench/results.json (root).
bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(ARTIFACTS) .mypy_cache .ruff_cache
