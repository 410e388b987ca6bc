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
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check privfl tests benchmarks

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache .hypothesis
