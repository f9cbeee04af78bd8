# One command sets everything up: `make venv` (also run by `make test` and `make demo`).
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-all demo bench clean-venv

$(STAMP): requirements.txt pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

venv: $(STAMP)

test: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q

demo: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/trimem demo

bench: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
