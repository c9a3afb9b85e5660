#!/usr/bin/env bash
# Build the GPU worker image and tag it by the hash of requirements.lock, so that an image tag
# names exactly one set of package versions. Prints the tag (used as DD_WORKER_IMAGE).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK_HASH=$(sha256sum requirements.lock | cut -c1-12)
TAG=${DD_IMAGE_REPO:-ddcore-gpu}:lock-${LOCK_HASH}
DOCKER_BUILDKIT=1 docker build -f infra/Dockerfile -t "$TAG" . >&2
echo "$TAG"
