# The two commands: `make demo` runs the main job, `make test` runs every test.
# Both set up what they need on a fresh machine and are safe to run again.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: demo test setup minio peers proto lint typecheck bench clean

demo: setup peers
	$(BIN)/strata demo

test: setup peers
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy cluster workers
	$(BIN)/pytest -v --durations=15

setup: $(STAMP) minio

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# Builds the pinned MinIO server with `go install` into ~/.cache/strata once.
minio: $(STAMP)
	$(BIN)/python -m cluster.ops.minio install

# DCMTK, GDCM and Orthanc from Debian: independent readers and peers the tests check against.
peers:
	bash deploy/local/install-peers.sh

# Regenerates cluster/rpc from proto/ (tests/unit/test_proto_stubs.py fails when stale).
proto: $(STAMP)
	$(BIN)/python -m cluster.dev.protogen

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy cluster workers

bench: setup peers
	$(BIN)/python bench/vs_orthanc.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
