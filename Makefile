# Two commands from a fresh clone: `make demo` and `make test`. Each creates .venv and installs
# the pinned dependencies first (torch==2.13.0 before anything that depends on torch, so pip
# never pulls a CUDA build of torch on a CPU machine).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-transformers5 demo bench lint clean gpu-check gpu-dist-check

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# pytest-xdist processes for `make test` (each test compiles from scratch: they share nothing)
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

# tests/test_transformers.py against the current transformers 5.x release (what `pip install
# transformers` gives users today) in a second venv; requirements.txt keeps its pinned 4.57.1
# for `make test`. TRANSFORMERS5 picks another spec, e.g. TRANSFORMERS5=transformers==5.0.0.
VENV_TF5 ?= .venv-transformers5
TRANSFORMERS5 ?= transformers>=5,<6
STAMP_TF5 := $(VENV_TF5)/.installed

$(STAMP_TF5): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV_TF5)
	$(VENV_TF5)/bin/python -m pip install -q --upgrade pip
	$(VENV_TF5)/bin/python -m pip install -q $(TORCH)
	$(VENV_TF5)/bin/python -m pip install -q -r requirements.txt
	$(VENV_TF5)/bin/python -m pip install -q --upgrade "$(TRANSFORMERS5)"
	$(VENV_TF5)/bin/python -m pip uninstall -q -y compressed-tensors  # needs transformers<5
	$(VENV_TF5)/bin/python -m pip install -q --no-deps -e .
	touch $(STAMP_TF5)

test-transformers5: $(STAMP_TF5)
	$(VENV_TF5)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(VENV_TF5)/bin/python -m pytest -q tests/test_transformers.py

demo: $(STAMP)
	$(BIN)/nmcompile demo

bench: $(STAMP)
	$(BIN)/python benchmarks/compile.py

# On a GPU machine with torch preinstalled and no network (wheels in ./.whl, fetched beforehand
# with ../shared/tools/gpu-wheels.sh): facts, CUDA tests and the quick GPU benchmark into OUT.
OUT ?= gpu_check_out
gpu-check:
	bash scripts/gpu-check.sh $(OUT)

# The same machine: FSDP2/DDP CUDA tests, the cost rule's checks and examples/{fsdp2,ddp}.py
# under torchrun on every GPU, into OUT.
gpu-dist-check:
	bash scripts/gpu-dist-check.sh $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(VENV_TF5) demo_out nm_dump .pytest_cache
