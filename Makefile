# The two commands of the quick start. Both create .venv on first use and
# install the project with torch pinned by constraints.txt (CPU build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# One epoch of PTB small REAL on the CPU (a few minutes), its valid/test
# perplexity, and a sample. The run folder runs/demo is replaced each time.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/tiedlm train configs/ptb/small-real.toml --out runs/demo --set train.max_epochs=1 --set train.device=cpu
	$(BIN)/tiedlm generate runs/demo --prompt "the company said" --words 40 --temperature 0.8 --seed 1

# PYTEST_ARGS adds pytest options (.ci/run: --durations=10, and -m kernels under an AVX2 cap).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Every folder with Python in it; tests/test_packaging.py reads this list and checks it is complete.
LINT := src tests scripts benchmarks

lint: $(STAMP)
	$(BIN)/ruff check $(LINT)
	$(BIN)/ruff format --check $(LINT)

clean:
	rm -rf $(VENV) runs/demo
