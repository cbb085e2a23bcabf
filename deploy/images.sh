#!/usr/bin/env bash
# Build the Kumiki images here, ship them to hosts without a registry (deploy/README.md "Air-gapped").
#
#   deploy/images.sh wheelhouse            download the SuperExec image's wheels into deploy/wheelhouse/
#                                          (needs a registry or PIP_INDEX_URL=<mirror>; Linux x86_64, CPython 3.11)
#   deploy/images.sh build                 docker compose -f deploy/compose/build.yml build
#                                          (from deploy/wheelhouse/ alone when it holds wheels)
#   deploy/images.sh save DIR              DIR/kumiki-images-<version>.tar.gz (+ its .sha256)
#   deploy/images.sh load FILE             docker load on the target host, after checking the sha256
#
# PIP_INDEX_URL: a mirror instead of PyPI. PIP_EXTRA_INDEX_URL: unset = the PyTorch CPU index, empty = none.
# KUMIKI_VERSION (default 0.1.0) names the image tags; FLWR_VERSION is pinned in deploy/Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${KUMIKI_VERSION:-0.1.0}"
IMAGES=("kumiki/superlink:$VERSION" "kumiki/proxy:$VERSION" "kumiki/supernode:$VERSION" "kumiki/superexec:$VERSION")
PYTHON="${PYTHON:-python3}"
# The PyTorch CPU index unless PIP_EXTRA_INDEX_URL is set; set and empty means no extra index (deploy/README.md;
# deploy/compose/build.yml reads it the same way for the build).
EXTRA_INDEX="${PIP_EXTRA_INDEX_URL-https://download.pytorch.org/whl/cpu}"

case "${1:-}" in
  wheelhouse)
    reqs=$(mktemp)                          # not in the checkout: the wheelhouse leaves no untracked file
    trap 'rm -f "$reqs"' EXIT
    "$PYTHON" deploy/image_requirements.py pyproject.toml > "$reqs"
    "$PYTHON" -m pip download --dest deploy/wheelhouse --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --python-version 3.11 \
      ${PIP_INDEX_URL:+--index-url "$PIP_INDEX_URL"} \
      ${EXTRA_INDEX:+--extra-index-url "$EXTRA_INDEX"} \
      -r "$reqs"
    ;;
  build)
    docker compose -f deploy/compose/build.yml build
    ;;
  save)
    dir="${2:?usage: deploy/images.sh save DIR}"
    mkdir -p "$dir"
    out="$dir/kumiki-images-$VERSION.tar.gz"
    docker save "${IMAGES[@]}" | gzip > "$out"
    (cd "$dir" && sha256sum "$(basename "$out")" > "$(basename "$out").sha256")
    echo "wrote $out and $out.sha256: copy both to each host, then: deploy/images.sh load $(basename "$out")"
    ;;
  load)
    file="${2:?usage: deploy/images.sh load FILE}"
    if [ -f "$file.sha256" ]; then (cd "$(dirname "$file")" && sha256sum -c "$(basename "$file").sha256"); fi
    docker load -i "$file"
    ;;
  *)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
