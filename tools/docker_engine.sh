#!/usr/bin/env bash
# A local Docker engine for tests and single-host trials, without systemd.
#
#   tools/docker_engine.sh install   apt-get install docker.io (+ debootstrap) when dockerd is missing
#   tools/docker_engine.sh start     start dockerd (unless the socket already answers) and create the
#                                    internal network; prints `export DOCKER_HOST=...`
#   tools/docker_engine.sh stop      stop the dockerd this script started (pid file), nothing else
#   tools/docker_engine.sh status    exit 0 when the engine answers
#
# Knobs (environment):
#   DOCKER_ENGINE_STATE  state dir: data root, exec root, pid file, log   (/tmp/diffmoe-docker)
#   DOCKER_HOST          socket to use                     (unix://$DOCKER_ENGINE_STATE/docker.sock)
#   DOCKER_NET           internal network for container-to-container traffic   (diffmoe-net)
#
# Why these dockerd flags: this machine has no systemd and its network is not ours to rewrite, so
# the daemon runs with --bridge=none --iptables=false (no default bridge, no NAT rules). Containers
# talk over a user-defined `--internal` network (no route out; no registry is reachable anyway).
set -euo pipefail

STATE="${DOCKER_ENGINE_STATE:-/tmp/diffmoe-docker}"
export DOCKER_HOST="${DOCKER_HOST:-unix://${STATE}/docker.sock}"
NET="${DOCKER_NET:-diffmoe-net}"
PIDFILE="${STATE}/dockerd.pid"
LOG="${STATE}/dockerd.log"

die() { echo "docker_engine.sh: error: $*" >&2; exit 1; }
need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (dockerd and apt-get need it)"; }
answers() { timeout 10 docker info >/dev/null 2>&1; }

cmd_install() {
  if command -v dockerd >/dev/null && command -v debootstrap >/dev/null; then
    echo "docker_engine.sh: dockerd and debootstrap already installed"
    return 0
  fi
  need_root
  # Another session may hold the dpkg lock (e.g. installing slurm): wait for it instead of failing.
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
    --no-install-recommends docker.io debootstrap
  command -v dockerd >/dev/null || die "apt-get finished but dockerd is still missing"
}

cmd_start() {
  if answers; then
    echo "docker_engine.sh: engine already answers at ${DOCKER_HOST}"
  else
    need_root
    command -v dockerd >/dev/null || die "dockerd not installed; run: $0 install"
    [[ ${DOCKER_HOST} == unix://* ]] || die "DOCKER_HOST=${DOCKER_HOST}: can only start a unix-socket engine"
    mkdir -p "${STATE}/data" "${STATE}/exec"
    rm -f "${PIDFILE}"
    # setsid: the daemon must not die with the shell (or pytest) that started it.
    setsid dockerd \
      --host "${DOCKER_HOST}" \
      --data-root "${STATE}/data" \
      --exec-root "${STATE}/exec" \
      --pidfile "${PIDFILE}" \
      --bridge=none --iptables=false --ip6tables=false \
      >"${LOG}" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
      answers && break
      sleep 1
    done
    answers || { tail -n 20 "${LOG}" >&2; die "dockerd did not answer within 60 s (log: ${LOG})"; }
    echo "docker_engine.sh: dockerd started (pid $(cat "${PIDFILE}"), log ${LOG})"
  fi
  if ! docker network inspect "${NET}" >/dev/null 2>&1; then
    docker network create --internal --driver bridge "${NET}" >/dev/null
    echo "docker_engine.sh: created internal network ${NET}"
  fi
  echo "export DOCKER_HOST=${DOCKER_HOST}"
}

cmd_stop() {
  if [[ ! -s ${PIDFILE} ]]; then
    echo "docker_engine.sh: no pid file at ${PIDFILE}; nothing started by this script"
    return 0
  fi
  local pid
  pid=$(cat "${PIDFILE}")
  if ! kill -0 "${pid}" 2>/dev/null; then
    echo "docker_engine.sh: dockerd ${pid} already gone"
    rm -f "${PIDFILE}"
    return 0
  fi
  # Containers first, so none is left half-running, then the daemon (which stops its containerd).
  local running
  running=$(docker ps -q 2>/dev/null || true)
  if [[ -n ${running} ]]; then
    # shellcheck disable=SC2086
    docker stop -t 5 ${running} >/dev/null || true
  fi
  kill -TERM "${pid}"
  for _ in $(seq 1 30); do
    kill -0 "${pid}" 2>/dev/null || break
    sleep 1
  done
  kill -0 "${pid}" 2>/dev/null && die "dockerd ${pid} did not stop within 30 s"
  rm -f "${PIDFILE}"
  echo "docker_engine.sh: dockerd ${pid} stopped"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status)
    if answers; then echo "engine answers at ${DOCKER_HOST}"; else echo "engine not running at ${DOCKER_HOST}"; exit 1; fi
    ;;
  *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
