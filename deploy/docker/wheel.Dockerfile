# The kvmesh wheel that every service image installs. Build it first (make images):
#   docker build -f deploy/docker/wheel.Dockerfile -t kvmesh/wheel:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvmesh ./kvmesh
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .
