# Entry points: `make demo` (install, then a small end-to-end run) and `make test` (install, then
# lint + full test suite). `make install` is idempotent and fast when nothing is missing.
PYTHON ?= python3
export PYTHON

.PHONY: install demo test lint

install:
	bash tools/install.sh

demo: install
	diffmoe-demo

test: install
	bash tools/run_tests.sh

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
