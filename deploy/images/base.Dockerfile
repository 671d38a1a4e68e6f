# FedGAN's base image: Python, torch, FedGAN and its dependencies, and the
# unprivileged user, shared by both roles (server/Dockerfile: the
# aggregator; client/Dockerfile: a site). `make images` builds it twice: on
# Python with the CPU torch for the aggregator, on NVIDIA's CUDA runtime with
# the CUDA torch for the sites.
#
#   docker build -f deploy/images/base.Dockerfile -t localhost/fedgan-base:cpu .
#
# BASE_IMAGE and TORCH_INDEX_URL go together. The base image is a build
# argument so that an air-gapped registry (or the tests, which build a Debian
# base locally) can supply its own.
ARG BASE_IMAGE=docker.io/library/python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# Extra pip options, e.g. "--no-index --find-links /wheels" for an offline build.
ARG PIP_OPTIONS=""

ENV PATH=/opt/fedgan/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FEDGAN_APP_PYPROJECT=/opt/fedgan/share/fedgan/pyproject.toml

# A virtual environment (python3-venv where the base lacks it) and the
# unprivileged user every process runs as: uid 10001, which also owns the
# site kit's keys and state.
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/fedgan \
    && groupadd --gid 10001 fedgan \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin fedgan \
    && mkdir -p /var/lib/fedgan /var/log/fedgan /etc/fedgan/nodes /data \
    && chown fedgan:fedgan /var/lib/fedgan /var/log/fedgan

# Dependencies before the code: this layer is reused until pyproject.toml changes.
COPY pyproject.toml /src/pyproject.toml
RUN pip install $PIP_OPTIONS ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" \
    && python3 -c "import tomllib; d = tomllib.load(open('/src/pyproject.toml', 'rb')); \
print('\\n'.join(r for r in d['project']['dependencies'] if not r.startswith('torch')))" \
        > /tmp/requirements.txt \
    && pip install $PIP_OPTIONS -r /tmp/requirements.txt "setuptools>=68" \
    && rm /tmp/requirements.txt

COPY README.md /src/README.md
COPY fedgan /src/fedgan
# The Flower app's definition stays in the image: `fedgan run` builds its
# config-only FAB from it (fedgan.config.appbundle).
RUN pip install $PIP_OPTIONS --no-deps --no-build-isolation /src \
    && install -D -m 0644 /src/pyproject.toml "$FEDGAN_APP_PYPROJECT" \
    && rm -rf /src

USER 10001:10001
WORKDIR /var/lib/fedgan
