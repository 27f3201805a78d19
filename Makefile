# relay: `make run` and `make test` do all their own setup on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install run test bench bench-quick profile lint audit format clean all

all: lint test

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

# With no DATABASE_URL: embedded PostgreSQL in .relay/pgdata, demo table, demo receiver, relay.
# With DATABASE_URL (and RELAY_CONFIG or CONFIG=path): relay for that database.
run: $(STAMP)
	$(BIN)/python -m relay.demo $(if $(CONFIG),--config $(CONFIG),)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks on an embedded PostgreSQL; results in bench-results/ (nothing asserted about speed).
bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

# relay draining 50,000 rows under py-spy: where the time goes, by part and by function.
profile: $(STAMP)
	$(BIN)/python -m bench.profile

lint: $(STAMP)
	$(BIN)/ruff check relay tests bench tools
	$(BIN)/ruff format --check relay tests bench tools
	$(BIN)/mypy

# Known vulnerabilities in the installed dependencies (pip-audit asks PyPI's advisory data, so it
# needs to reach pypi.org); installed on demand, not a dependency of relay.
audit: $(STAMP)
	$(BIN)/python -m pip install --quiet pip-audit
	$(BIN)/pip-audit --skip-editable

format: $(STAMP)
	$(BIN)/ruff format relay tests bench tools
	$(BIN)/ruff check --fix relay tests bench tools

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
