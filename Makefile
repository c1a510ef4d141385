# Everything a fresh machine needs is installed here (pip only).
# Dependencies come from the lock files (generated from pyproject.toml by `make lock`):
# requirements-dev.lock here and in CI, requirements.lock in the Docker image; the shared
# packages carry the same pins in both, so CI tests what ships.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes --no-header --quiet

.PHONY: install demo test bench serve lock docker-smoke clean

$(STAMP): pyproject.toml requirements-dev.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python scripts/bench_relay.py

serve: $(STAMP)
	$(BIN)/shim serve

# Re-pin after editing pyproject.toml's dependencies (uv from PyPI; resolves for Python >= 3.11).
# The dev lock is resolved first; the image's lock is constrained to the same versions.
lock:
	$(BIN)/pip install --quiet uv
	$(UV_COMPILE) --extra embedded --extra dev -o requirements-dev.lock
	$(UV_COMPILE) -c requirements-dev.lock -o requirements.lock

# Needs docker (not in CI): build the production image and place one simulated call against it.
docker-smoke: $(STAMP)
	scripts/docker_smoke.sh

clean:
	rm -rf $(VENV) .shim demo-out
