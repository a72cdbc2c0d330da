# adq-deploy: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch, installed before the package so its `torch>=2.4` range is already
# met and pip never fetches a CUDA build. Elsewhere: `make TORCH=torch` (or your own pin).
TORCH  ?= torch==2.13.0
DATA   := /usr/share/datasets/fashion-mnist
STAMP  := $(VENV)/.installed
CKPT   ?= examples/fmnist_resnet20_adq.pt
DEMO   := build/demo

.PHONY: setup data ops demo test test-oldest lint table clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist package (no download at run time).
data:
	@test -f $(DATA)/t10k-images-idx3-ubyte.gz || bash scripts/install-data.sh

# The ai.adq onnxruntime op library (C++), against headers from Debian's libonnxruntime-dev.
ops:
	bash scripts/build-ops.sh

# Main job: evaluate the shipped checkpoint, export it (adq format) and validate the export.
demo: setup data ops
	$(BIN)/adq-eval $(CKPT)
	$(BIN)/adq-export $(CKPT) --format adq -o $(DEMO)/fmnist_resnet20.adq.onnx
	$(BIN)/adq-validate $(DEMO)/fmnist_resnet20.adq.onnx --checkpoint $(CKPT) \
		--report $(DEMO)/report.json

test: setup data
	$(BIN)/python -m pytest

# The suite again on the oldest versions pyproject.toml admits, in their own venv: onnxruntime
# 1.21 (the op library's floor), onnx 1.20, onnxsim 0.7, NumPy 1.26, click 8.2, tqdm 4.60.
# torch stays $(TORCH), the only CPU wheel at hand here. Tests of exports that need a newer
# onnxruntime (docs/export.md) skip with that reason (`-rs` lists them).
OLDEST := onnxruntime==1.21.1 onnx==1.20.0 onnxsim==0.7.0 numpy==1.26.0 click==8.2.0 tqdm==4.60.0
OLDEST_VENV ?= .venv-oldest

test-oldest: data ops
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(OLDEST_VENV)/bin/python -m pip install -q -e '.[dev]' $(OLDEST)
	$(OLDEST_VENV)/bin/python -m pytest -rs

lint: setup
	$(BIN)/ruff check .

# The Fashion-MNIST results table of the README (hours on 2 CPU cores, minutes on a GPU).
table: setup data
	$(BIN)/python examples/fashion_mnist_table.py --out runs/fmnist

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info .pytest_cache .ruff_cache
