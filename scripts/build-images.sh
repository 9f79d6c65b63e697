#!/usr/bin/env bash
# Builds the container images of mesh-apiserver and mesh-agent from images/Dockerfile.
#
# Usage: scripts/build-images.sh [TAG]          (default TAG: dev)
#   REGISTRY=localhost   image name prefix: $REGISTRY/mesh-apiserver:$TAG, $REGISTRY/mesh-agent:$TAG
#   DOCKER=docker        the container CLI (docker, or podman with its docker-compatible CLI)
#
# Needs a working container engine with BuildKit (Docker 23+ builds with it by default).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-dev}
registry=${REGISTRY:-localhost}
docker=${DOCKER:-docker}

if ! command -v "$docker" >/dev/null 2>&1; then
  echo "build-images.sh: '$docker' not found: install Docker (https://docs.docker.com/engine/install/)" \
    "or set DOCKER to a compatible CLI; no image was built" >&2
  exit 1
fi
if ! "$docker" info >/dev/null 2>&1; then
  echo "build-images.sh: '$docker' is installed but cannot reach a container engine" \
    "('$docker info' failed): start the daemon or check your permissions; no image was built" >&2
  exit 1
fi

for target in apiserver agent; do
  image="$registry/mesh-$target:$tag"
  echo "== building $image (images/Dockerfile, target $target)"
  DOCKER_BUILDKIT=1 "$docker" build --file images/Dockerfile --target "$target" --tag "$image" .
done

echo "== base images used (pin these digests with --build-arg for a release):"
for arg in RUST_IMAGE APISERVER_BASE AGENT_BASE; do
  base=$(sed -n "s/^ARG $arg=//p" images/Dockerfile)
  digest=$("$docker" image inspect --format '{{index .RepoDigests 0}}' "$base" 2>/dev/null || true)
  echo "  $arg=${digest:-$base (not in the local image store)}"
done
echo "built $registry/mesh-apiserver:$tag and $registry/mesh-agent:$tag"
