# Two commands set everything up on a fresh machine with Python 3.10+:
#   make quickstart   # the offline demo run
#   make test         # ruff, then the test suite (what CI runs)
# Also: `make smoke` (a seconds-long run: finetune-cli debug=tiny) and `make lint` (ruff alone;
# `.venv/bin/ruff check --fix .` sorts imports and drops unused ones).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install quickstart smoke lint test test-all clean

# uv installs the same packages as pip in half the time (torch alone is ~5 GB); where uv
# cannot be had, pip does it. The editable install puts the checkout on sys.path (compat mode), so that
# Hydra finds the launchers in hydra_plugins/ as it finds an installed plugin. Bytecode is compiled at install, as pip does: with
# PYTHONDONTWRITEBYTECODE set, every import would otherwise compile torch from source again.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	{ $(PY) -m pip install --quiet uv && $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) \
	    -C editable_mode=compat -e '.[dev]'; } \
	  || $(PY) -m pip install --quiet --config-settings editable_mode=compat -e '.[dev]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/finetune-cli experiment=quickstart

smoke: install  # seconds: the whole pipeline on a few tiny synthetic images
	$(VENV)/bin/finetune-cli debug=tiny

lint: install
	$(VENV)/bin/ruff check .

# Two test processes, one torch thread each: on 2 cores the suite takes about 20% less time than
# one process with two threads (most tests are small models where one thread is as fast).
TEST_PROCESSES ?= 2

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_PROCESSES)

test-all: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_PROCESSES) -m ''

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
