# `make test` is exactly what .ci/run runs (README's test command).
PY ?= python

.PHONY: test test-gpu lint format bench docs
test:
	$(PY) -m pytest -n auto

test-gpu:
	$(PY) -m pytest -m gpu -v

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) tools/import_cycles.py

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench:
	$(PY) bench/pipeline_overlap.py

# docs/cli.md from the declared options (tests/test_cli_reference.py fails while it is stale)
docs:
	$(PY) tools/cli_reference.py
