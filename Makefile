# GastroLens: `make run` starts the daemon on the embedded default, `make test` runs the suite.
# Both create .venv and install the Debian tools the tests use when they are missing.
# `make check` lints (ruff) and type-checks (mypy); `make test` runs it first (CI runs `make test`).
# `make test-deploy`: the container image and Kubernetes manifests run with podman (CI runs it after `make test`).
# `make test-fast`: the suite without the subprocess daemon, real peers (DCMTK, Orthanc,
# Chromium), PostgreSQL and training runs, for the edit-test loop; markers are set in tests/conftest.py.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?=
PYTEST_ARGS ?=

.PHONY: run test test-fast test-deploy check bootstrap debian-tools demo bench clean

bootstrap: $(STAMP) debian-tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

debian-tools:
	@bash scripts/bootstrap-debian.sh

run: bootstrap
	@echo "GastroLens: push images with e.g."
	@echo "  TCP_NODELAY=1 /usr/bin/storescu -aec GASTROLENS 127.0.0.1 11112 IMAGE.dcm"
	@echo "or try 'gastrolens demo' in another terminal ($(BIN)/gastrolens demo); Ctrl-C stops."
	$(BIN)/gastrolens serve $(if $(CONFIG),--config $(CONFIG))

check: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: bootstrap check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The container image and the Kubernetes manifests with real containers (podman kube play): builds the
# image (cached layers), receiver x1 + worker x2 on this machine's PostgreSQL; about 5-15 min. CI runs it after `make test`.
test-deploy: bootstrap
	@bash scripts/bootstrap-deploy.sh
	$(BIN)/python -m pytest -m deploy tests/deploy/test_containers.py -s $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not postgres and not daemon and not peer and not trains" $(PYTEST_ARGS)

bench: bootstrap
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/models.py

clean:
	rm -rf var test-artifacts .pytest_cache
