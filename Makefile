# The two commands a newcomer needs: `make demo` and `make test` (both install first).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# the machine's pip config lists local indexes that may be absent; hide that noise only
PIPFILTER := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "fedsyft needs Python 3.11, found " + sys.version' 
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing fedsyft and its pinned dependencies into $(VENV) (first time: a few minutes)"
	@$(BIN)/pip install --quiet -e '.[dev]' 2>&1 | $(PIPFILTER)
	@$(BIN)/pip check
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedsyft demo --report reports/demo.json

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/demo.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache reports
