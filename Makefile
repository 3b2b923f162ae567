# The two commands a newcomer needs: `make run` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEPS_STAMP := $(VENV)/.deps-stamp
EDITABLE_STAMP := $(VENV)/.editable-stamp
# Strict editable installs link files one by one, so a new module needs a re-install: depend on
# the package directories, whose modification time changes when files are added or removed.
PKG_DIRS := $(shell find kubetune operator trainer -type d -not -name __pycache__ 2>/dev/null)
EXAMPLE ?= manifests/examples/quickstart.yaml
# pip and setuptools print screens of notices on a successful install (editable-install warnings
# among them); their output goes to this file, shown only when a step fails.
SETUP_LOG := $(VENV)-setup.log
logged = ( $(1) ) >> $(SETUP_LOG) 2>&1 || { echo "kubetune: setup step failed: $(1)"; tail -n 40 $(SETUP_LOG); echo "full log: $(SETUP_LOG)"; exit 1; }

.PHONY: setup dev-install testbin run test test-unit lint format crds docs bench clean

setup: $(EDITABLE_STAMP)

# torch first (PyPI's build: it carries the CUDA libraries, about 3 GB, and runs on the CPU), then
# deepspeed without build isolation (its setup imports torch), then everything else resolved in one
# pass against the pinned set in constraints.txt (`pip freeze` of that pass, CUDA wheels included).
$(DEPS_STAMP): pyproject.toml constraints.txt
	@echo "kubetune: installing dependencies into $(VENV) (a few minutes the first time; log: $(SETUP_LOG))"
	@: > $(SETUP_LOG)
	@$(call logged,test -x $(PY) || $(PYTHON) -m venv $(VENV))
	@$(call logged,$(PIP) install --upgrade pip setuptools wheel)
	@$(call logged,$(PIP) install -c constraints.txt torch==2.13.0)
	@$(call logged,$(PIP) install -c constraints.txt --no-build-isolation deepspeed)
	@$(call logged,$(PIP) install -c constraints.txt -e '.[dev]' --config-settings editable_mode=strict)
	@touch $@

$(EDITABLE_STAMP): $(DEPS_STAMP) $(PKG_DIRS)
	@$(call logged,$(PIP) install --no-deps --no-build-isolation -e . --config-settings editable_mode=strict)
	@touch $@

dev-install:
	@$(call logged,$(PIP) install --no-deps --no-build-isolation -e . --config-settings editable_mode=strict)
	@touch $(EDITABLE_STAMP)

run: setup
	@$(VENV)/bin/kubetune quickstart-data
	@$(VENV)/bin/kubetune run $(EXAMPLE)

# The real-cluster tier's binaries (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# etcd, MinIO) and helm for the chart's tests, built from their Go modules once per version into
# ~/.cache/kubetune/testbin.
testbin:
	bash tests/testbin/build.sh && bash tests/testbin/helm.sh

test: setup testbin
	$(PY) -m pytest -q -ra

test-unit: setup
	$(PY) -m pytest -q -m unit

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy kubetune operator trainer
	$(VENV)/bin/kubetune crds --check
	$(VENV)/bin/kubetune docs --check

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

crds: setup
	$(VENV)/bin/kubetune crds

docs: setup
	$(VENV)/bin/kubetune docs

bench: setup
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
