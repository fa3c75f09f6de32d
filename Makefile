# Common tasks. `make run` sets up and starts a development server;
# `make test` runs the test suite.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
UPSTREAM_PORT ?= 9100

.PHONY: run test lint format fake-upstream clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements/base.txt requirements/test.txt requirements/production.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements/test.txt -r requirements/production.txt
	touch $@

.env:
	$(BIN)/python scripts/make_env.py

run: $(VENV)/.installed .env
	$(BIN)/python manage.py migrate --no-input
	$(BIN)/python manage.py runserver $(HOST):$(PORT)

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

fake-upstream: $(VENV)/.installed
	$(BIN)/python -m tests.fake_upstream --port $(UPSTREAM_PORT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

.PHONY: serve bench

# Production server with the settings in gunicorn.conf.py (see docs/production.md).
serve: $(VENV)/.installed
	$(BIN)/gunicorn -c gunicorn.conf.py proxy_site.wsgi

# Benchmark against a direct call and the LiteLLM proxy; writes docs/benchmarks.md.
bench: $(VENV)/.installed
	$(BIN)/python bench/run.py
