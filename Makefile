# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SHELL  := bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# (grep drops pip's notes about local index folders this machine's pip config names)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,flower]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m privfl.bench demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not deployment and not slow"

# The tests marked slow (attack acceptance runs, Flower simulations; about 6 minutes); CI runs them too
.PHONY: test-slow
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not deployment"

# SuperLink + SuperNodes on 127.0.0.1 running the Flower example (about 4 minutes); CI runs it too
.PHONY: test-deployment
test-deployment: $(STAMP)
	$(BIN)/python -m pytest -q -m deployment

# ruff's lint rules (E501 at the configured line length included) and its formatting; CI runs both
lint: $(STAMP)
	$(BIN)/ruff check privfl tests benchmarks examples
	$(BIN)/ruff format --check privfl tests benchmarks examples

# rewrite the tree in ruff's format (what `make lint` checks)
.PHONY: format
format: $(STAMP)
	$(BIN)/ruff format privfl tests benchmarks examples

# mypy on privfl/, configured in pyproject.toml ([tool.mypy]).
.PHONY: typecheck
typecheck: $(STAMP)
	$(BIN)/mypy

# The documentation site (mkdocs-material + mkdocstrings), built with --strict into site/.
DOCS_STAMP := $(VENV)/.docs-installed-stamp

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[docs]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	touch $(DOCS_STAMP)

.PHONY: docs
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache .mypy_cache .hypothesis
