# FedGAN: the three commands a newcomer needs are `make setup`, `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedgan-setup
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Pinned here for this machine kind (a CPU wheel on disk); the site image
# installs the CUDA build instead.
TORCH  := torch==2.13.0

.PHONY: setup system-deps demo test unit integration lint clean

setup: $(STAMP) system-deps

# Re-runs only when pyproject.toml changes: a second `make setup` takes seconds.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH) -e '.[dev]'
	@touch $(STAMP)

# Debian packages the local deployment and the tests run for real: nginx
# (edge and sidecars) and Prometheus (scrapes the exporter in a test).
system-deps:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: setup
	$(BIN)/fedgan demo

lint: setup
	$(BIN)/ruff check fedgan tests

unit: setup
	$(BIN)/pytest -q tests/unit

integration: setup
	$(BIN)/pytest -q tests/integration

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf runs .pytest_cache .ruff_cache
