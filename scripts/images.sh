#!/usr/bin/env bash
# Build kvmesh's images on a machine without a container daemon or registry access:
# buildah (Debian package, chroot isolation) from a python base image made here with
# debootstrap (Debian bookworm's python3.11 + pip), in place of python:3.11-slim-bookworm.
# Usage: scripts/images.sh [SERVICE ...]   (default: router edge; also gateway, worker-cpu)
# The base image trusts this host's CA bundle, so pip inside builds reaches PyPI through
# the same TLS proxy the host does. Images land in buildah's local storage as
# localhost/kvmesh/SERVICE:0.1.0.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SERVICES=("$@")
[ ${#SERVICES[@]} -gt 0 ] || SERVICES=(router edge)
TAG=0.1.0
BASE=localhost/kvmesh-python:3.11-bookworm
export BUILDAH_ISOLATION=chroot

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install buildah debootstrap)" >&2; exit 1; }
done

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "==> base image $BASE (debootstrap bookworm: python3, pip, venv)"
  ctr="$(buildah from scratch)"
  mnt="$(buildah mount "$ctr")"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$mnt" http://deb.debian.org/debian >/dev/null
  # An image's python, like the official ones: pip installs into it, `python` exists.
  rm -f "$mnt"/usr/lib/python3.*/EXTERNALLY-MANAGED
  ln -sf python3 "$mnt/usr/bin/python"
  ln -sf pip3 "$mnt/usr/bin/pip"
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$mnt/etc/ssl/certs/ca-certificates.crt"
  fi
  rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/*.bin
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    --env PIP_DISABLE_PIP_VERSION_CHECK=1 --cmd python3 "$ctr"
  buildah commit -q "$ctr" "$BASE" >/dev/null
  buildah rm "$ctr" >/dev/null
fi

build() {
  echo "==> kvmesh/$1:$TAG"
  buildah bud -q --format docker --network host --layers -f "deploy/docker/$1.Dockerfile" \
    --build-arg PYTHON_IMAGE="$BASE" --build-arg WHEEL_IMAGE="localhost/kvmesh/wheel:$TAG" \
    -t "kvmesh/$1:$TAG" . >/dev/null
}
build wheel
for service in "${SERVICES[@]}"; do build "$service"; done
echo "==> built: ${SERVICES[*]}"
