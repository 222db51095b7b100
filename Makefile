# Two entry points a newcomer needs: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench bench-quick soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/convstore demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check eventstore conversations projections handlers tests bench
	$(BIN)/ruff format --check eventstore conversations projections handlers tests bench
	$(BIN)/mypy --strict eventstore conversations projections handlers

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

# N webhook deliveries while the projector, the server and PostgreSQL are killed (tests/soak.py)
soak: $(STAMP)
	$(BIN)/python -m tests.soak --deliveries 20000

clean:
	rm -rf $(VENV) .convstore
