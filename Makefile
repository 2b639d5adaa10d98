# virtuplex: every target that needs the environment depends on `install`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.install.stamp
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
SYNTH_DIR ?= data/synthetic
# 48 tissues of 512 px: 34 train / 7 val / 7 test (the downstream analyses compare held-out samples)
SYNTH_TISSUES ?= 48
ROSIE_CONFIG ?= experiments/configs/rosie/synthetic.yaml
VIRTUES_CONFIG ?= experiments/configs/virtues/synthetic.yaml
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: install test test-slow bench-gpu exp-rosie exp-virtues exp-virtues-downstream exp-matrix bench data-synthetic clean

install: $(STAMP)

# Rebuilt only when pyproject.toml changes: a second `make install` does nothing.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_PINS)
	$(PIP) install -e '.[dev]'
	$(PY) -c "import torch, torchvision, timm, zarr, lightning; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'zarr', zarr.__version__)"
	touch $(STAMP)

# pytest exits 5 when nothing is collected: not a failure of the project.
test: install
	$(PY) -m pytest -q -n 2 --timeout 900; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-slow: install
	$(PY) -m pytest -q -m slow --timeout 3600

data-synthetic: install
	@if grep -q '"n_tissues": $(SYNTH_TISSUES),' $(SYNTH_DIR)/.complete 2>/dev/null; then echo "synthetic dataset present: $(SYNTH_DIR)"; else \
	  $(PY) -m experiments.data_synthetic --out $(SYNTH_DIR) --tissues $(SYNTH_TISSUES) --size 512 --seed 0 --overwrite; fi

exp-rosie: install data-synthetic
	$(PY) -m experiments.rosie_experiment --config $(ROSIE_CONFIG) --data $(SYNTH_DIR)

exp-virtues: install data-synthetic
	$(PY) -m experiments.virtues_experiment --config $(VIRTUES_CONFIG) --data $(SYNTH_DIR)

# VirTues downstream science (Figs. 3e-g, 4, 5, Suppl. Fig. 20) on the synthetic cohort preset
COHORT_DIR ?= data/cohort
exp-virtues-downstream: install
	$(PY) -m experiments.virtues_downstream --cohort $(COHORT_DIR)

# Every table/figure of one paper as a resumable cell: make exp-matrix PAPER=rosie [MATRIX_ARGS="--list"]
PAPER ?= rosie
MATRIX_ARGS ?=
exp-matrix: install data-synthetic
	$(PY) -m experiments.matrix --paper $(PAPER) $(MATRIX_ARGS)

# GPU speed table (prints "no GPU" and exits 0 without one)
bench-gpu: install
	$(PY) -m benchmarks.gpu_suite

bench: install
	$(PY) -m benchmarks.datamodules_throughput
	$(PY) -m benchmarks.rosie_inference
	$(PY) -m benchmarks.virtues_attention

clean:
	rm -rf $(VENV) runs wandb lightning_logs .pytest_cache data/synthetic
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
