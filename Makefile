# kdcli developer entry points.  `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KDCLI := $(BIN)/kdcli
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
# Plugin packages shipped as examples: installed beside kdcli, their tests run with the suite.
PLUGIN_EXAMPLES := examples/kdcli-dkd
EXPERIMENT_ARGS ?=
BENCH ?=

.PHONY: venv install demo test bench gpu-wheels gpu-check gpu-check-cpu experiment-tfkd experiment-feature-mimic experiment-soteacher experiment-fusion clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when the package metadata (dependencies, entry points) changes.
$(VENV)/.installed: pyproject.toml $(PLUGIN_EXAMPLES:%=%/pyproject.toml) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,plot,tensorboard,wandb,mlflow,hub,onnx]" $(PLUGIN_EXAMPLES:%=-e %)
	touch $@

venv install: $(VENV)/.installed

# torch's default (a thread per core, spinning) crawls when other processes share the cores (a teach epoch took
# 16 s with 1 thread and 66 s with 2 on a busy 2-core machine): DEMO_THREADS=2 may help on a quiet one.
DEMO_THREADS ?= 1
demo: $(VENV)/.installed
	OMP_NUM_THREADS=$(DEMO_THREADS) $(KDCLI) teach --out $(DEMO_DIR)/teacher --overwrite --epochs 12
	OMP_NUM_THREADS=$(DEMO_THREADS) $(KDCLI) distill --teacher $(DEMO_DIR)/teacher/last.safetensors --out $(DEMO_DIR)/student --overwrite --epochs 12
	OMP_NUM_THREADS=$(DEMO_THREADS) $(KDCLI) eval $(DEMO_DIR)/student/last.safetensors

# One intra-op thread per process: the suite runs several torch processes at once
# (torchrun, kill tests), and oversubscribed cores make torch's spinning threads crawl.
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks $(BENCH)

# A GPU machine runs its image's python3 and torch, offline.  `make gpu-wheels` (here, with internet)
# downloads what such an image lacks for kdcli (pydantic and its needs, setuptools to build kdcli)
# into $(GPU_WHEELS) for the GPU machine's Python; `make gpu-check` (there) installs them and kdcli
# beside its torch (benchmarks/gpu_setup.sh), runs the CUDA tests and the CIFAR-100 speed check, and
# writes gpu_check.json and gpu_check.log to $$OUT (else runs/gpu-check): about 8 minutes on one GPU.
GPU_WHEELS ?= .whl
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS := $(foreach n,2_28 2_27 2_17,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64
GPU_SITE ?= /tmp/kdcli-site
GPU_CHECK_ARGS ?=
gpu-wheels: $(VENV)/.installed
	rm -rf $(GPU_WHEELS)
	$(BIN)/python -m pip download --quiet --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS) "pydantic>=2" "setuptools>=77"
	ls $(GPU_WHEELS)

gpu-check:
	bash benchmarks/gpu_setup.sh $(GPU_WHEELS) $(GPU_SITE)
	PYTHONPATH=$(GPU_SITE) PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# The same check scaled down on this machine's CPU: proves the script end to end (a few minutes).
gpu-check-cpu: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.gpu_check --device cpu --smoke $(GPU_CHECK_ARGS)

# The experiments of docs/results.md, each on the synthetic data set with 3 seeds (tens of CPU minutes on 2
# cores); each writes its table to runs/experiments/NAME/results.md and its plot to docs/results/NAME.png.
# Finished runs are reused, so a rerun with more arms or seeds trains only what is new.  EXPERIMENT_ARGS adds flags.
EXPERIMENTS_OUT ?= runs/experiments
experiment-tfkd: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python examples/experiments/tfkd.py --out $(EXPERIMENTS_OUT)/tfkd --figure docs/results/tfkd.png $(EXPERIMENT_ARGS)

experiment-feature-mimic: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python examples/experiments/feature_mimic.py --out $(EXPERIMENTS_OUT)/feature-mimic --figure docs/results/feature_mimic.png $(EXPERIMENT_ARGS)

experiment-soteacher: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python examples/experiments/soteacher_vs_standard.py --out $(EXPERIMENTS_OUT)/soteacher --figure docs/results/soteacher.png $(EXPERIMENT_ARGS)

experiment-fusion: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python examples/experiments/adaptive_fusion.py --out $(EXPERIMENTS_OUT)/fusion --figure docs/results/fusion.png $(EXPERIMENT_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
