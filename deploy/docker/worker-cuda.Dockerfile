# kvmesh worker on NVIDIA GPUs: vLLM's own CUDA image (vLLM 0.32.0, CUDA torch) plus the
# kvmesh worker. Models come from a folder, a Hugging Face id, s3:// or gs:// at run time.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG WHEEL_IMAGE=kvmesh/wheel:0.1.0
FROM ${WHEEL_IMAGE} AS wheel

FROM ${VLLM_IMAGE}
COPY --from=wheel /wheels /wheels
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir "$(ls /wheels/kvmesh-*.whl)[worker]" \
    && rm -rf /wheels \
    && useradd --uid 10001 --create-home kvmesh
USER 10001
ENV KVMESH_WORKER_HOST=0.0.0.0 \
    KVMESH_WORKER_PORT=50100 \
    KVMESH_WORKER_METRICS_PORT=9100
EXPOSE 50100 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s \
    CMD ["python3", "-m", "kvmesh.core.health_probe", "127.0.0.1:50100"]
ENTRYPOINT ["python3", "-m", "kvmesh.worker"]
CMD ["--no-ray"]
