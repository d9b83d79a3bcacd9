#!/usr/bin/env bash
# Build the image on a workstation, then copy the .sif to the cluster's shared filesystem:
#   containers/build.sh docker      -> docker image model-parallel-suite:latest
#   containers/build.sh apptainer   -> mps.sif (from containers/mps.def, needs apptainer --fakeroot)
#   containers/build.sh sif-from-docker -> mps.sif converted from the local Docker image
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  docker) docker build -f containers/Dockerfile -t model-parallel-suite:latest . ;;
  apptainer) apptainer build --fakeroot mps.sif containers/mps.def ;;
  sif-from-docker) apptainer build mps.sif docker-daemon://model-parallel-suite:latest ;;
  *) echo "usage: containers/build.sh {docker|apptainer|sif-from-docker}" >&2; exit 2 ;;
esac
