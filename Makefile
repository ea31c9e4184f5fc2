# jaxvision — the entry points of the README: `make demo`, `make test` and `make bench`.
# Each creates ./.venv on first use and install what they need (pinned by constraints.txt).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 is pinned: an unpinned torch would pull a multi-GB CUDA build.
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test test-slow bench lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.core: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test,onnx,data]"
	# CLIP's real BPE vocabulary for the tokenizer tests ships in this wheel (no torch pulled in).
	$(PIP) --no-deps open-clip-torch==3.3.0
	# ONNX export: jax2onnx pins orbax-checkpoint<0.11.37 (we use 0.12) but needs none of it, nor its
	# equinox/dm-pix/netron extras, to convert Flax models; what it does need is the onnx extra above.
	$(PIP) --no-deps jax2onnx==0.17.1
	touch $@

demo: $(VENV)/.core
	# The main job: DreamBooth on the embedded tiny default (a RANDOM-weight SD model written locally,
	# subject photos from jaxvision/assets): class images, training, validation grids, checkpoints, export.
	$(BIN)/python -m jaxvision dreambooth --config configs/dreambooth/tiny.yaml --init-demo
	# ViT: a small model trained here on scikit-learn's digits (97.8 % top-1 on its test split) classifies real digits.
	$(BIN)/python -m jaxvision classify --model jaxvision/assets/digits-vit jaxvision/assets/digits/*.png --top-k 3
	$(BIN)/python -m jaxvision embed --model jaxvision/assets/digits-vit jaxvision/assets/digits/*.png \
		--normalize --out build/demo-embeddings.npy

test: $(VENV)/.test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 2 --dist loadfile --durations=15

test-slow: $(VENV)/.test
	$(BIN)/pytest -q -m slow --durations=15

# The quick benchmark suite (a few minutes on 2 cores: ViT-L/16-384 batch 1, tiny SD) against the
# references it times in the same run: torch, transformers and diffusers, and open-clip's BPE file for
# SD's tokenizer, which is everything the test install brings. The full CPU and GPU suites: README, Benchmarks.
bench: $(VENV)/.test
	$(BIN)/python -m benchmarks.run --quick

lint: $(VENV)/.test
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

format: $(VENV)/.test
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf build $(VENV)
