# Every target that needs Python bootstraps .venv first (idempotent: a stamp file
# records that the install finished, so a second call costs nothing).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test lint bench bench-data gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned resolve would pull the CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python -m speedrun.train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check speedrun tests hydra_plugins benchmarks
	$(BIN)/ruff format --check speedrun tests hydra_plugins benchmarks

bench: $(STAMP)
	$(BIN)/python -m speedrun.bench $(ARGS)

bench-data: $(STAMP)
	$(BIN)/python -m speedrun.bench --only data $(ARGS)

# The acceptance run for a CUDA machine (a few minutes); one line and exit 0 without CUDA.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .cache build *.egg-info
	find multirun_outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
