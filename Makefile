# Two commands set everything up on a fresh machine with Python 3.10+:
#   make quickstart   # the offline demo run
#   make test         # the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install quickstart test test-all clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/finetune-cli experiment=quickstart

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m ''

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
