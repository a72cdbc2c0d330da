# adq-deploy: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch, installed before the package so its `torch>=2.4` range is already
# met and pip never fetches a CUDA build. Elsewhere: `make TORCH=torch` (or your own pin).
TORCH  ?= torch==2.13.0
DATA   := /usr/share/datasets/fashion-mnist
STAMP  := $(VENV)/.installed

.PHONY: setup data demo test lint clean

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

demo: setup data
	$(BIN)/python examples/quickstart.py

test: setup data
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
