# Every target that needs Python bootstraps .venv first (idempotent: a stamp file
# records that the install finished, so a second call costs nothing).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The exact versions of everything but torch (pinned by TORCH_SPEC), as CI tests them; `make lock`
# rewrites it from the current .venv after a dependency change.
LOCK := requirements.lock

.PHONY: install train test lint bench bench-data gpu-check lock clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned resolve would pull the CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python -m speedrun.train $(ARGS)

# Two workers (-n): most tests spend their time in real training processes, one CPU core each.
# --dist loadfile keeps each file on one worker, so a module's fixtures (a reference run, the SLURM test
# cluster) are built once.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check speedrun tests benchmarks hydra_plugins
	$(BIN)/ruff format --check speedrun tests benchmarks hydra_plugins

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(ARGS)

bench-data: $(STAMP)
	$(BIN)/python benchmarks/bench.py --only data $(ARGS)

lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable --all | grep -v -E '^(torch|pip|setuptools|wheel)==' > $(LOCK)

# The acceptance run for a CUDA machine (a few minutes); one line and exit 0 without CUDA.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .cache build *.egg-info
	find multirun_outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
