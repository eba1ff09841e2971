# onerec-prod: two commands on a fresh machine.
#   make demo   - set up everything, then run the main job on the embedded default
#   make test   - set up everything, then run the test suite (what .ci/run runs)
# Set-up is idempotent and cached: the venv is rebuilt only when pyproject.toml changes,
# pip reuses its download cache, Spark's Ivy cache keeps Delta's jars.

PYTHON     ?= python3.11
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export DS_BUILD_OPS := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR := $(HOME)/.cache/onerec-prod/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-slow lint bench clean-var help

help:
	@echo "make demo       set up, then replay Beauty days through Airflow, train, gate, promote, serve"
	@echo "make test       set up, then run the tests (not the slow ones)"
	@echo "make test-slow  the slow end-to-end tests"
	@echo "make lint       ruff"
	@echo "make clean-var  delete ./var (lake, models, mlflow, airflow home)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip check
	$(PY) -m onerec_prod.spark --warm
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/onerec-prod demo

test: setup
	$(PY) -m pytest tests

test-slow: setup
	$(PY) -m pytest tests -m slow

lint: setup
	$(VENV)/bin/ruff check onerec_prod jobs dags tests bench

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-var:
	rm -rf var
