#!/usr/bin/env bash
# Build the diffmoe-dist image on a machine with no registry, in three cached steps:
#   1. rootfs image   debootstrap a minimal Debian bookworm (python3 3.11) and `docker import` it
#   2. base image     docker/Dockerfile.cpu: a venv with the CPU torch wheel (the NGC stand-in)
#   3. project image  docker/Dockerfile FROM the base, offline, with the project's dependency
#                     wheels in the build context (built here with `pip wheel`, under $WORK)
# Steps 1 and 2 are skipped when their image exists (FORCE=1 rebuilds them); step 3 always runs
# (docker's layer cache makes an unchanged rebuild take seconds).
#
#   tools/build_base_image.sh            all three steps
#   tools/build_base_image.sh --base     steps 1-2 only
#
# Knobs (environment): DOCKER_HOST (as tools/docker_engine.sh prints it), WORK
# [/tmp/diffmoe-docker-build], MIRROR [http://deb.debian.org/debian], ROOTFS_IMAGE
# [diffmoe-rootfs:bookworm], BASE_IMAGE [diffmoe-base:cpu-torch2.13.0], IMAGE [diffmoe-dist:cpu],
# SKIP_REQUIREMENTS [""] (setup.py requirements left out of the image), FORCE [0].
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"

export DOCKER_HOST="${DOCKER_HOST:-unix:///tmp/diffmoe-docker/docker.sock}"
# The legacy builder: BuildKit's Dockerfile frontend would have to be pulled from a registry.
export DOCKER_BUILDKIT=0
WORK="${WORK:-/tmp/diffmoe-docker-build}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
ROOTFS_IMAGE="${ROOTFS_IMAGE:-diffmoe-rootfs:bookworm}"
BASE_IMAGE="${BASE_IMAGE:-diffmoe-base:cpu-torch2.13.0}"
IMAGE="${IMAGE:-diffmoe-dist:cpu}"
SKIP_REQUIREMENTS="${SKIP_REQUIREMENTS:-}"
FORCE="${FORCE:-0}"
PYTHON="${PYTHON:-python3}"
# Wheels must match the image's python (bookworm: 3.11) and the host's pinned torch.
BASE_REQUIREMENTS=(torch==2.13.0 setuptools wheel)

log() { echo "build_base_image.sh: $*"; }
die() { echo "build_base_image.sh: error: $*" >&2; exit 1; }
has_image() { [[ ${FORCE} != 1 ]] && docker image inspect "$1" >/dev/null 2>&1; }
elapsed() { echo "$((SECONDS - $1)) s"; }

docker info >/dev/null 2>&1 || die "no Docker engine at ${DOCKER_HOST}; run tools/docker_engine.sh start"
[[ $("${PYTHON}" -c 'import sys; print("%d.%d" % sys.version_info[:2])') == 3.11 ]] \
  || die "${PYTHON} is not python 3.11; the wheels must match bookworm's python3.11"
mkdir -p "${WORK}"

# Pin every wheel to the version installed on this host, so the image runs what the tests here run.
"${PYTHON}" -m pip freeze --exclude-editable 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' > "${WORK}/host-pins.txt" || true
pip_pins=(-c "${REPO}/constraints.txt" -c "${WORK}/host-pins.txt")

# ---- 1. rootfs image
t0=${SECONDS}
if has_image "${ROOTFS_IMAGE}"; then
  log "1/3 ${ROOTFS_IMAGE} exists, skipped"
else
  [[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
  command -v debootstrap >/dev/null || die "debootstrap missing; run tools/docker_engine.sh install"
  rootfs="${WORK}/rootfs"
  rm -rf "${rootfs}"
  log "1/3 debootstrap bookworm into ${rootfs} (log ${WORK}/debootstrap.log)"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,procps,iproute2 \
    bookworm "${rootfs}" "${MIRROR}" >"${WORK}/debootstrap.log" 2>&1 \
    || { tail -n 20 "${WORK}/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/* "${rootfs}"/tmp/*
  tar -C "${rootfs}" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "${ROOTFS_IMAGE}" >/dev/null
  rm -rf "${rootfs}"
  log "1/3 ${ROOTFS_IMAGE} imported in $(elapsed "${t0}")"
fi

# ---- 2. base image (torch in a venv)
t0=${SECONDS}
if has_image "${BASE_IMAGE}"; then
  log "2/3 ${BASE_IMAGE} exists, skipped"
else
  ctx="${WORK}/base-context"
  rm -rf "${ctx}" && mkdir -p "${ctx}/wheelhouse"
  # The torch wheel comes from this machine's disk (pip's find-links); nothing is downloaded.
  "${PYTHON}" -m pip download -q "${pip_pins[@]}" -d "${ctx}/wheelhouse" "${BASE_REQUIREMENTS[@]}"
  printf '%s\n' "${BASE_REQUIREMENTS[@]}" > "${ctx}/requirements.txt"
  log "2/3 building ${BASE_IMAGE} ($(du -sh "${ctx}/wheelhouse" | cut -f1) of wheels)"
  docker build -q -f docker/Dockerfile.cpu --build-arg "ROOTFS_IMAGE=${ROOTFS_IMAGE}" \
    -t "${BASE_IMAGE}" "${ctx}" >/dev/null
  log "2/3 ${BASE_IMAGE} built in $(elapsed "${t0}")"
fi
[[ ${1:-} == --base ]] && exit 0

# ---- 3. project image
t0=${SECONDS}
ctx="${WORK}/project-context"
rm -rf "${ctx}" && mkdir -p "${ctx}/wheelhouse"
# The files of the working tree (tracked and untracked-not-ignored), not .git or run outputs.
git ls-files -z --cached --others --exclude-standard -- setup.py pyproject.toml constraints.txt \
  diffmoe_dist configs launchers docker \
  | while IFS= read -r -d '' f; do [[ -e ${f} ]] && printf '%s\0' "${f}"; done \
  | xargs -0 cp --parents -t "${ctx}"
[[ -f ${ctx}/setup.py ]] || die "setup.py missing from the working tree"
# Dependency wheels: everything setup.py needs, minus what the base already has (torch & co).
# --no-build-isolation: sdists (deepspeed) build against the host's torch, offline.
# Cached on the inputs that decide them (rebuilt wheels differ byte-wise and would defeat the
# docker layer cache). Built from a copy: an in-tree build leaves build/ and *.egg-info behind.
stamp=$(cat "${ctx}/setup.py" "${REPO}/constraints.txt" "${WORK}/host-pins.txt" | sha256sum | cut -c1-16)
if [[ -f ${WORK}/wheels/.stamp && $(cat "${WORK}/wheels/.stamp") == "${stamp}" && ${FORCE} != 1 ]]; then
  log "3/3 dependency wheels up to date (${stamp})"
else
  rm -rf "${WORK}/wheels" "${WORK}/wheel-src" && cp -r "${ctx}" "${WORK}/wheel-src"
  DS_BUILD_OPS=0 "${PYTHON}" -m pip wheel -q "${pip_pins[@]}" --no-build-isolation \
    -w "${WORK}/wheels" "${WORK}/wheel-src" >"${WORK}/pip-wheel.log" 2>&1 \
    || { tail -n 20 "${WORK}/pip-wheel.log" >&2; die "pip wheel of the project failed"; }
  echo "${stamp}" > "${WORK}/wheels/.stamp"
fi
base_has=$(docker run --rm --entrypoint pip "${BASE_IMAGE}" list --format=freeze \
  | cut -d= -f1 | tr 'A-Z_.' 'a-z--')
for whl in "${WORK}"/wheels/*.whl; do
  name=$(basename "${whl}" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
  [[ ${name} == diffmoe-dist ]] && continue
  grep -qx -- "${name}" <<<"${base_has}" || cp "${whl}" "${ctx}/wheelhouse/"
done
log "3/3 building ${IMAGE} FROM ${BASE_IMAGE} ($(du -sh "${ctx}/wheelhouse" | cut -f1) of wheels)"
docker build -f "${ctx}/docker/Dockerfile" --build-arg "BASE_IMAGE=${BASE_IMAGE}" \
  --build-arg "PIP_INSTALL_ARGS=--no-index" --build-arg "SKIP_REQUIREMENTS=${SKIP_REQUIREMENTS}" \
  -t "${IMAGE}" "${ctx}" >"${WORK}/docker-build.log" 2>&1 \
  || { tail -n 30 "${WORK}/docker-build.log" >&2; die "docker build of ${IMAGE} failed (log ${WORK}/docker-build.log)"; }
log "3/3 ${IMAGE} built in $(elapsed "${t0}") ($(docker image inspect -f '{{.Size}}' "${IMAGE}" | awk '{printf "%.0f MB", $1/1e6}'))"
