# One command sets everything up: `make venv` (also run by `make test` and `make demo`).
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-all demo clean-venv

$(STAMP): requirements.txt pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

venv: $(STAMP)

test: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(CURDIR)/$(BIN)/python -m pytest -q -m "not slow"

test-all: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(CURDIR)/$(BIN)/python -m pytest -q

demo: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(CURDIR)/$(BIN)/trimem demo

clean-venv:
	rm -rf $(VENV)
