# mlnb: two commands on a fresh machine.
#   make demo   set up .venv (pinned dependencies) and run the main job on the embedded default
#   make test   set up .venv and run every check, in the order CI runs them
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PIPQUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mlnb-installed
PG_BINARIES := $(wildcard /usr/lib/postgresql/*/bin/initdb)

# make lock: rewrite constraints.txt from the set-up .venv (after changing a range or a pin in settings.ini).
.PHONY: lock setup bytecode demo test check-export check-clean lint types nbtest pytest system-deps bench clean

setup: $(STAMP)

# Exact versions from constraints.txt (the lock; settings.ini holds the ranges users resolve within). torch first:
# the CPU wheel (2.13.0) lies on this machine's disk, and pytorch-lightning installed first would pull a CUDA build.
$(STAMP): settings.ini setup.py constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==26.3 $(PIPQUIET)
	$(BIN)/python -m pip install --quiet -c constraints.txt setuptools wheel torch $(PIPQUIET)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all,dev]" $(PIPQUIET)
	@# The kernel papermill runs is this venv's own Python, registered inside the venv (never in ~).
	$(BIN)/python -m ipykernel install --sys-prefix --name mlnb --display-name "Python (mlnb .venv)" >/dev/null
	@touch $(STAMP)

# pip compiles a package it installs, but not one installed editable: with PYTHONDONTWRITEBYTECODE set
# (as on CI) every mlnb process, and every kernel and worker a sweep starts, would compile mlnb/ from
# source. Compiled against each file's hash, so a re-export that leaves a file unchanged keeps it.
bytecode: setup
	@$(BIN)/python -m compileall -q --invalidation-mode checked-hash mlnb >/dev/null

# The main job on the embedded default: the template project (ingest -> validate -> features ->
# train -> evaluate -> report on scikit-learn's breast cancer data), run in build/demo with its
# SQLite store. Run it twice: the second run restores every step from the cache.
demo: setup bytecode
	@test -f build/demo/mlnb.yaml || $(BIN)/mlnb init build/demo
	cd build/demo && ../../$(BIN)/mlnb run
	@echo; cd build/demo && ../../$(BIN)/mlnb runs list --limit 1
	@echo; echo "Reports: build/demo/reports/latest/index.html (one HTML page per step beside it)"
	@echo "Next: cd build/demo && ../../$(BIN)/mlnb run -p train.model=random_forest"
	@echo "      ../../$(BIN)/mlnb registry register demo --run train && ../../$(BIN)/mlnb registry promote demo 1"
	@echo "      ../../$(BIN)/mlnb run --pipeline score && ../../$(BIN)/mlnb report   # reports/index.html"

test: setup system-deps
	@$(MAKE) --no-print-directory check-export
	@$(MAKE) --no-print-directory bytecode
	@$(MAKE) --no-print-directory check-clean
	@$(MAKE) --no-print-directory lint
	@$(MAKE) --no-print-directory types
	@$(MAKE) --no-print-directory nbtest
	@$(MAKE) --no-print-directory pytest

# The package must be exactly what nbdev_export writes from the notebooks.
check-export: setup
	@before=$$(find mlnb -type f -name '*.py' | sort | xargs sha256sum | sha256sum); \
	$(BIN)/nbdev_export; \
	after=$$(find mlnb -type f -name '*.py' | sort | xargs sha256sum | sha256sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "FAIL: nbdev_export changed mlnb/: the package was out of step with nbs/."; \
	  echo "      It has now been re-exported; review 'git diff -- mlnb' and commit it."; exit 1; \
	fi; echo "ok: mlnb/ matches nbs/"

# Notebooks are committed clean: no execution counts, no churning metadata.
check-clean: setup
	@before=$$(find nbs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | sort | xargs sha256sum | sha256sum); \
	$(BIN)/nbdev_clean; \
	after=$$(find nbs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | sort | xargs sha256sum | sha256sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "FAIL: some notebooks were not clean (nbdev_clean changed them; review and commit)."; exit 1; \
	fi; echo "ok: notebooks are clean"

# ruff on the code; import-linter on the layers (.importlinter: imports point down, also inside functions)
lint: setup
	$(BIN)/ruff check mlnb tests bench
	$(BIN)/lint-imports --no-cache

# pyright (basic mode, pyrightconfig.json) on the package: the annotations say what the code does.
# Its wheel carries pyright and Node, so nothing is downloaded here.
types: setup
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(BIN)/pyright

nbtest: setup
	$(BIN)/nbdev_test --n_workers 2

# pytest's exit code 5 means it collected nothing: a missing suite is a failure, not a pass.
pytest: setup
	@$(BIN)/python -m pytest tests/ -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "FAIL: pytest collected no tests from tests/"; exit 1; fi; exit $$rc

# Servers and the browser the whole-system tests use come from Debian's packages: PostgreSQL (a
# throwaway cluster on 127.0.0.1) and Chromium (driven by Playwright; never `playwright install`).
DEBIAN_PACKAGES := $(if $(PG_BINARIES),,postgresql) $(if $(wildcard /usr/bin/chromium),,chromium)
system-deps:
	@if [ -n "$(strip $(DEBIAN_PACKAGES))" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's $(strip $(DEBIAN_PACKAGES)) for the whole-system tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
	  elif command -v sudo >/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
	  else echo "warning: no root to install $(strip $(DEBIAN_PACKAGES)): the tests that need them will be skipped"; fi; \
	fi

# Benchmarks compare mlnb with the tools users would otherwise use; those live in their own venv.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: Makefile
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet mlflow==3.17.2 ploomber==0.23.3 dvc==3.67.1 \
	  papermill==2.7.0 $(PIPQUIET)
	@touch $@

bench: setup bytecode $(BENCH_VENV)/.installed
	$(BIN)/python bench/tracking.py --mlflow-python $(BENCH_VENV)/bin/python
	$(BIN)/python bench/pipeline.py --bench-python $(BENCH_VENV)/bin/python
	$(BIN)/python bench/train_tune.py
	$(BIN)/python bench/explain_panel.py
	$(BIN)/python bench/operations.py
	$(BIN)/python bench/scale.py --mlflow-python $(BENCH_VENV)/bin/python

lock: setup
	@{ grep '^#' constraints.txt; $(BIN)/python -m pip freeze --all --exclude-editable | grep -v -e '^mlnb==' -e '^pip=='; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt; echo "constraints.txt: $$(grep -vc '^#' constraints.txt) exact versions"

clean:
	rm -rf $(VENV) _docs .pytest_cache build
