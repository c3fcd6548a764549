# The two commands of the README: `make demo` runs the system, `make test` runs every check. Both install what they
# need first (tools/bootstrap.sh: apt-get where missing, a venv, the package with its C extension).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edge-installed
NATIVE := $(wildcard native/*.c native/*.h)

.PHONY: all test demo lint typecheck unit bench clean

all: test

$(STAMP): pyproject.toml setup.py $(NATIVE) tools/bootstrap.sh
	./tools/bootstrap.sh
	touch $@

lint: $(STAMP)
	$(PY) -m ruff check edge tests tools
	$(PY) -m ruff format --check edge tests tools

typecheck: $(STAMP)
	$(PY) -m mypy

# EDGE_REQUIRE_NATIVE makes a missing or broken extension an error instead of a fallback to the numpy twin.
unit: $(STAMP)
	EDGE_REQUIRE_NATIVE=1 $(PY) -m pytest -q

test: lint typecheck unit

demo: $(STAMP)
	EDGE_REQUIRE_NATIVE=1 $(PY) tools/demo.py

bench: $(STAMP)
	$(PY) tools/bench/preprocess.py
	$(PY) tools/bench/pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info edge/_native*.so
