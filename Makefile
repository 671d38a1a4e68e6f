# FedGAN: the three commands a newcomer needs are `make setup`, `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedgan-setup
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Pinned here for this machine kind (a CPU wheel on disk); the site image
# installs the CUDA build instead.
TORCH  := torch==2.13.0

# Containers. COMPOSE: `docker compose`, or `podman-compose` where podman is the engine.
ENGINE  ?= docker
COMPOSE ?= docker compose
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
SITE    ?=
AGGREGATOR_HOST ?=

.PHONY: setup system-deps container-deps demo test unit integration lint clean \
	certs images up down site-kit test-containers

setup: $(STAMP) system-deps

# Re-runs only when pyproject.toml changes: a second `make setup` takes seconds.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH) -e '.[dev]'
	@touch $(STAMP)

# Debian packages the local deployment and the tests run for real: nginx
# (edge and sidecars), Prometheus (scrapes the exporter in a test) and
# docker-compose 1.29 (validates the compose files; no engine needed).
system-deps:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || missing="$$missing prometheus"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
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
	$(BIN)/pytest -q --durations=25

# What `make test-containers` needs: podman and podman-compose run the
# containers, debootstrap builds their Debian base (no registry is reachable),
# runc/netavark/aardvark-dns as podman's runtime and networking here, and iptables,
# which netavark calls to set up each network (podman only suggests it; without
# it every container fails to start with "netavark: No such file or directory").
container-deps:
	@missing=""; \
	for p in podman podman-compose debootstrap runc netavark aardvark-dns iptables; do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The staging consortium's PKI in ./certs (CA, aggregator with the compose
# service names, site-1..3, nodes/*.pub). Keeps what exists.
certs: setup
	$(BIN)/fedgan pki staging --out certs --sites 3 $(if $(AGGREGATOR_HOST),--san $(AGGREGATOR_HOST))

# The aggregator and site images, each on FedGAN's base image
# (deploy/images/base.Dockerfile): on Python with the CPU torch for the
# aggregator, on NVIDIA's CUDA runtime with the CUDA torch for the sites.
CUDA_BASE  ?= docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04
CUDA_TORCH ?= https://download.pytorch.org/whl/cu128
images:
	$(ENGINE) build -f deploy/images/base.Dockerfile -t localhost/fedgan-base:cpu .
	$(ENGINE) build -f deploy/images/base.Dockerfile -t localhost/fedgan-base:cuda \
		--build-arg BASE_IMAGE=$(CUDA_BASE) --build-arg TORCH_INDEX_URL=$(CUDA_TORCH) .
	$(ENGINE) build -f server/Dockerfile --build-arg FEDGAN_BASE=localhost/fedgan-base:cpu \
		-t localhost/fedgan-server:latest -t localhost/fedgan-server:$(VERSION) .
	$(ENGINE) build -f client/Dockerfile --build-arg FEDGAN_BASE=localhost/fedgan-base:cuda \
		-t localhost/fedgan-site:latest -t localhost/fedgan-site:$(VERSION) .

# The staging consortium on this host: synthetic silos in ./data if none.
up: certs
	@for i in 1 2 3; do \
		test -d data/site-$$i || $(BIN)/fedgan silo synth data/site-$$i --kind fundus --n 256 --seed $$i; \
	done
	$(COMPOSE) up -d

down:
	$(COMPOSE) down

# A site's kit for hand-over: dist/fedgan-site-<SITE>.tar.gz
site-kit: setup
	@test -n "$(SITE)" || { echo "usage: make site-kit SITE=<site-id>"; exit 2; }
	$(BIN)/fedgan site-kit $(SITE) --certs certs --kit deploy/site --out dist

# Real containers with podman: build the base, the stand-in nginx and
# Prometheus, and both FedGAN images offline; bring up docker-compose.yml;
# run one federated round; check it; tear down. Layers are reused across runs.
test-containers: setup container-deps
	$(BIN)/pytest -q tests/containers

clean:
	rm -rf runs .pytest_cache .ruff_cache
