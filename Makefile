# The two commands of the README. Both create or reuse .venv and install only what is missing.
VENV := .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup:
	@bash scripts/setup_venv.sh

demo: setup
	$(VENV)/bin/cvseg demo --out out/demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) test

clean:
	rm -rf build install log out .pytest_cache
