# Two commands: `make run` (set up and serve on 127.0.0.1:8000) and `make test` (set up and test;
# `make test-fast` for a quick loop without the SmolLM2 and service tests).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf
HOST ?= 127.0.0.1
PORT ?= 8000
# llama-cpp-python never loads its multimodal library here (only vision chat handlers import it):
# skipping it cuts the llama.cpp compile from 193 to 140 steps. The rest are the arguments every llama.cpp
# build here gets (scripts/llama_cpp_cmake_args.sh: the AMX kernels' fix).
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF $(shell bash scripts/llama_cpp_cmake_args.sh)

.PHONY: run test test-fast setup local-env deps dev-deps model migrate demo bench soak clean

# Local settings for every command run after `make run` (the README's `manage.py create_api_key`
# included): a git-ignored .env with DEBUG=1 and a SECRET_KEY generated once; llmsite/settings.py
# reads it, and the environment wins. A deployment has no .env and keeps the production defaults.
LOCAL_ENV ?= .env
local-env: $(LOCAL_ENV)
$(LOCAL_ENV):
	umask 077 && $(PYTHON) -c 'import secrets; print("# Written by make run for local development (git-ignored; the environment wins).\nDEBUG=1\nSECRET_KEY=" + secrets.token_urlsafe(50))' > $@
	@echo "Wrote $@ (DEBUG=1 and a new SECRET_KEY) for local commands."

# settings.py defaults are production's (DEBUG off, a SECRET_KEY required): the local server opts
# into DEBUG unless the caller says otherwise (`make run DEBUG=0 SECRET_KEY=...`).
run setup migrate demo: export DEBUG ?= 1
run: setup
	@echo "Serving on http://$(HOST):$(PORT)/  (admin: http://$(HOST):$(PORT)/admin/)"
	$(PY) manage.py serve -b $(HOST) -p $(PORT) llmsite.asgi:application  # daphne, draining on SIGTERM

# The tests opt into DEBUG themselves (tests/settings.py, tests/live.py) and run production in children.
test: dev-deps model
	$(VENV)/bin/lint-imports --no-cache  # the layer contracts of pyproject.toml (docs/ARCHITECTURE.md)
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick loop: the suite without the tests of the real SmolLM2 model and live servers (marker
# smollm2) and of Redis, PostgreSQL, Chromium, nginx, llama-server (services); tests/conftest.py marks them.
test-fast: dev-deps
	$(VENV)/bin/lint-imports --no-cache  # the layer contracts of pyproject.toml (docs/ARCHITECTURE.md)
	$(PY) -m pytest -m "not smollm2 and not services" $(PYTEST_ARGS)

setup: local-env deps model migrate demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The stamp files make a second run skip installs whose requirements did not change.
$(VENV)/.deps: requirements.txt scripts/llama_cpp_cmake_args.sh scripts/build_llama_wheel.sh \
		$(wildcard scripts/llama_cpp_patches/*.patch) | $(PY)
	@echo "Installing requirements. llama-cpp-python compiles llama.cpp from source the first time:"
	@echo "about 7 minutes on a 2-core machine (its wheel is kept for later setups)."
	wheel=$$(bash scripts/build_llama_wheel.sh $(PY)) && $(PY) -m pip install --quiet --no-deps --force-reinstall "$$wheel"
	bash scripts/pip_install.sh $(PY) -r requirements.txt
	touch $@

$(VENV)/.dev-deps: requirements-dev.txt $(VENV)/.deps
	bash scripts/pip_install.sh $(PY) -r requirements-dev.txt
	touch $@

deps: $(VENV)/.deps
dev-deps: $(VENV)/.dev-deps

model: $(MODEL)
$(MODEL): | $(PY)
	$(PY) scripts/fetch_model.py $(MODEL)

migrate: deps
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v0

demo: migrate
	$(PY) manage.py import_resources
	$(PY) manage.py ensure_admin

# Benchmarks (bounded, loopback only): the engine alone, then W1-W4 through the API side by side with
# llama.cpp's llama-server (built once, cached) and llama-cpp-python's server.
# BENCH_ARGS is passed to bench.api_bench, e.g. BENCH_ARGS="--quick" or BENCH_ARGS="--only W4".
bench: dev-deps model
	$(PY) -m bench.engine_bench
	bash scripts/build_llama_server.sh >/dev/null
	$(PY) -m bench.api_bench $(BENCH_ARGS)
	$(PY) -m bench.report

# The long part of the reliability suite: a mixed-traffic soak (needs Redis on 127.0.0.1:6379).
soak: dev-deps model
	$(PY) -m bench.soak --seconds $(or $(SOAK_SECONDS),120)
	$(PY) -m bench.report

clean:
	rm -rf $(VENV) staticfiles .pytest_cache
