# Developer entry points. `make demo` runs the whole system on the built-in data; `make test` is what CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: venv demo app test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[dev,data,train,megatron,app]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m cluster.demo $(ARGS)

APP_MODEL ?= runs/demo/t2i
app: venv  # the web playground (python -m eval.app) on the demo's run, after `make demo`; APP_MODEL=<folder|ckpt|run>
	$(BIN)/python -m eval.app --model $(APP_MODEL) $(ARGS)

test: venv
	$(BIN)/python -m pytest -q tests

test-fast: venv  # the single-process tests only (skips the multi-process and end-to-end ones marked slow)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv
	$(BIN)/python tests/benchmarks/bench_sampling.py
	$(BIN)/python tests/benchmarks/bench_tokenize.py
	$(BIN)/python tests/benchmarks/bench_train_step.py
	$(BIN)/python tests/benchmarks/bench_checksums.py
	$(BIN)/python tests/benchmarks/bench_watch_overhead.py
	$(BIN)/python tests/benchmarks/bench_loader_storage.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
