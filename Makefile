# `make test` is exactly what .ci/run runs (README's test command).
PY ?= python

.PHONY: test test-gpu lint format bench
test:
	$(PY) -m pytest -n auto

test-gpu:
	$(PY) -m pytest -m gpu -v

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench:
	$(PY) bench/pipeline_overlap.py
