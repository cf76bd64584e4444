# The kvmesh wheel that every service image installs. Build it first (make images):
#   docker build -f deploy/docker/wheel.Dockerfile -t kvmesh/wheel:0.1.0 .
# It is a build stage, never run: no user or health check of its own.
# checkov:skip=CKV_DOCKER_2: build stage only (its /wheels are copied into the images)
# checkov:skip=CKV_DOCKER_3: build stage only (its /wheels are copied into the images)
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvmesh ./kvmesh
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .
