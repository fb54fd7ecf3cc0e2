# syntax=docker/dockerfile:1
# Courier's container image.
#
#   docker build -t courier:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp/courier -p 8080:8080 \
#     -e COURIER_AMQP_URL=amqp://user:pass@rabbitmq:5672/ courier:0.1.0
#
# The builder stage installs Courier and its dependencies (the ranges in
# pyproject.toml) into a self-contained virtual environment; the final stage
# is the same slim base with only that venv copied in, run as a non-root
# numeric user. Nothing is written to the image's filesystem at run time:
# spooled source files go to COURIER_TMP_DIR, which Kubernetes mounts as an
# emptyDir (deploy/base/deployment.yaml) and docker-compose as a tmpfs.

# Keep both stages on the same base so the venv's interpreter links stay valid.
FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the build needs (see .dockerignore): metadata first, then the code.
COPY pyproject.toml README.md ./
COPY service ./service
# Build a wheel, then install it (not editable) with its dependencies into the
# venv; pip byte-compiles everything here, so the read-only runtime needs no
# .pyc writes. COURIER_EXTRAS adds optional extras, e.g.
# `--build-arg COURIER_EXTRAS=otel` for OpenTelemetry spans.
ARG COURIER_EXTRAS=""
# DL3013: the wheel is our own; its dependencies' ranges come from pyproject.toml.
# hadolint ignore=DL3013
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && wheel="$(echo /wheels/*.whl)" \
    && pip install --no-cache-dir "${wheel}${COURIER_EXTRAS:+[${COURIER_EXTRAS}]}" \
    && courier schema > /dev/null


FROM python:3.11.13-slim-bookworm

ARG COURIER_UID=10001

LABEL org.opencontainers.image.title="courier" \
      org.opencontainers.image.description="Consumes upload requests from RabbitMQ, fetches files from S3 or HTTP(S) and delivers them to Inconvo or Mindset AI." \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric user and group, so Kubernetes' runAsNonRoot can verify them
# and file ownership is the same everywhere. The temp dir exists and is owned
# by that user even when nothing is mounted on it.
RUN groupadd --system --gid "${COURIER_UID}" courier \
    && useradd --system --uid "${COURIER_UID}" --gid "${COURIER_UID}" \
       --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin courier \
    && mkdir -p /tmp/courier \
    && chown "${COURIER_UID}:${COURIER_UID}" /tmp/courier \
    && chmod 0700 /tmp/courier

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    COURIER_TMP_DIR=/tmp/courier \
    TMPDIR=/tmp/courier \
    COURIER_HTTP_PORT=8080

USER 10001:10001
WORKDIR /tmp/courier

EXPOSE 8080

# Kubernetes uses its own probes (deploy/base/deployment.yaml); this one is for
# plain Docker and docker-compose. The slim image has no curl, hence Python.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('COURIER_HTTP_PORT', '8080'), timeout=4)"]

# SIGTERM (the default stop signal) makes `courier run` finish in-flight work
# within COURIER_SHUTDOWN_TIMEOUT, requeue the rest and exit 0.
ENTRYPOINT ["courier"]
CMD ["run"]
