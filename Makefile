# GastroLens: `make run` starts the daemon on the embedded default, `make test` runs the suite.
# Both create .venv and install the Debian tools the tests use when they are missing.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?=
PYTEST_ARGS ?=

.PHONY: run test bootstrap debian-tools demo bench clean

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

test: bootstrap
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: bootstrap
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/models.py

clean:
	rm -rf var test-artifacts .pytest_cache
