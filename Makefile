# The two commands: `make conformance` and `make test`. Both set up what they need.
VENV := .venv
BIN := $(VENV)/bin
ARTIFACTS ?= artifacts

.PHONY: setup conformance test unit lint clean bench

setup:
	@scripts/bootstrap

conformance: setup
	$(BIN)/pinhole conformance --json $(ARTIFACTS)/conformance.json --junit $(ARTIFACTS)/conformance.xml --artifacts $(ARTIFACTS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

# Every test: lint, unit tests (no root), end-to-end tests and the clause suite (root).
test: lint
	$(BIN)/pytest -p no:cacheprovider -rfEs --durations=15 --pinhole-artifacts $(ARTIFACTS) tests testbed/clauses

# The performance goals (P1-P4) as ratios measured in one run; writes bench/results.json (root).
bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(ARTIFACTS) .mypy_cache .ruff_cache
