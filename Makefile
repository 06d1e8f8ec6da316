# kdcli developer entry points.  `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KDCLI := $(BIN)/kdcli
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when the package metadata (dependencies, entry points) changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,plot]"
	touch $@

venv install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(KDCLI) teach --out $(DEMO_DIR)/teacher --overwrite --epochs 12
	$(KDCLI) distill --teacher $(DEMO_DIR)/teacher/last.safetensors --out $(DEMO_DIR)/student --overwrite --epochs 12
	$(KDCLI) eval $(DEMO_DIR)/student/last.safetensors

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks

# adaptive-fusion under label noise: learned vs fixed vs ADA vs WLS ratios, 3 seeds (tens of minutes on 2 cores).
.PHONY: experiment-fusion
experiment-fusion: $(VENV)/.installed
	$(BIN)/python examples/experiments/adaptive_fusion.py --out runs/experiment-fusion

clean:
	rm -rf $(VENV) runs .pytest_cache
