# Entry points (README "Set-up" says which needs what):
#   make demo   NO root. Creates (or reuses) a virtual environment $(VENV) in this checkout, installs the
#               Python dependencies there (torch's 2.13.0 CPU wheel, this package editable with its test
#               extras), then runs the embedded default job. Touches no system package.
#   make test   ROOT or sudo (CI: .ci/run). Installs the apt packages the SLURM and Docker tests start,
#               the Python dependencies into $(PYTHON), then ruff + the full suite.
# Both installs are idempotent and fast when nothing is missing.
PYTHON ?= python3
VENV ?= .venv
DEMO_ARGS ?=
export PYTHON

.PHONY: venv demo install test lint

venv:
	bash tools/install.sh --venv $(VENV)

# The venv's bin/ first on PATH (as `activate` does), so the demo's processes all run from it.
demo: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" VIRTUAL_ENV="$(abspath $(VENV))" diffmoe-demo $(DEMO_ARGS)

install:
	@echo "make test: installs system packages for the SLURM and Docker tests (apt; needs root or sudo), then Python packages into $(PYTHON)"
	bash tools/install.sh --system-packages

test: install
	bash tools/run_tests.sh

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
