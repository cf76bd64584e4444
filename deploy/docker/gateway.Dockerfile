# kvmesh gateway: OpenAI HTTP + Inference gRPC. It fetches tokenizers from workers, so it
# carries no model files. The parsers extra brings vLLM's tool-call and reasoning parsers
# (they import torch): TORCH_INDEX_URL may point pip at a CPU-only torch wheel index.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG WHEEL_IMAGE=kvmesh/wheel:0.1.0
FROM ${WHEEL_IMAGE} AS wheel

FROM ${PYTHON_IMAGE}
ARG TORCH_INDEX_URL=""
COPY --from=wheel /wheels /wheels
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0 \
    && pip install --no-cache-dir "$(ls /wheels/kvmesh-*.whl)[gateway,parsers]" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && rm -rf /wheels \
    && useradd --uid 10001 --create-home kvmesh
USER 10001
ENV KVMESH_GATEWAY_HOST=0.0.0.0 \
    KVMESH_GATEWAY_PORT=8000 \
    KVMESH_GATEWAY_GRPC_PORT=50052 \
    KVMESH_GATEWAY_ROUTER=kvmesh-router:50051
EXPOSE 8000 50052
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s \
    CMD ["python", "-m", "kvmesh.core.health_probe", "127.0.0.1:50052"]
ENTRYPOINT ["python", "-m", "kvmesh.gateway"]
