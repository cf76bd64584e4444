# kvmesh router: no torch, no vLLM, no Ray (a small image that starts in under a second).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG WHEEL_IMAGE=kvmesh/wheel:0.1.0
FROM ${WHEEL_IMAGE} AS wheel

FROM ${PYTHON_IMAGE}
COPY --from=wheel /wheels /wheels
# hadolint ignore=DL3013
RUN pip install --no-cache-dir /wheels/kvmesh-*.whl \
    && rm -rf /wheels \
    && useradd --uid 10001 --create-home kvmesh
USER 10001
ENV KVMESH_ROUTER_HOST=0.0.0.0 \
    KVMESH_ROUTER_PORT=50051 \
    KVMESH_ROUTER_METRICS_PORT=9100
EXPOSE 50051 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s \
    CMD ["python", "-m", "kvmesh.core.health_probe", "127.0.0.1:50051"]
ENTRYPOINT ["python", "-m", "kvmesh.router"]
