# neurohybrid: `make run` runs the demo cohort end to end, `make test` runs the test suite.
# Both create .venv on first use and install the pinned environment (envs/requirements.lock).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run report test test-slow bench lint clean

$(STAMP): pyproject.toml envs/requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r envs/requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

install: $(STAMP)

run: install
	$(BIN)/neurohybrid run --cores $(CORES)
	snakemake --report results/report.html

test: install
	$(BIN)/python -m pytest -m "not slow" --hypothesis-seed=0

test-slow: install
	$(BIN)/python -m pytest -m slow

bench: install
	$(BIN)/neurohybrid bench all

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow/rules
	snakemake --lint

clean:
	rm -rf results .snakemake
