#!/usr/bin/env bash
# A local SLURM cluster on this one machine, for tests and for trying the launchers.
#
#   tools/slurm_cluster.sh install                 apt-get slurmctld/slurmd/slurm-client/munge if missing
#   tools/slurm_cluster.sh start [--nodes 1|2]     munged + slurmctld + N slurmd ("node1", "node2")
#   tools/slurm_cluster.sh stop                    end the daemons this script started (pid files)
#   tools/slurm_cluster.sh status                  sinfo
#   tools/slurm_cluster.sh env                     print `export SLURM_CONF=...` for eval
#
# Everything (slurm.conf, munge key and socket, logs, spool, state) lives under SLURM_STATE_DIR
# (default /tmp/diffmoe-slurm). Clients find the config through SLURM_CONF; `start` also links
# /etc/slurm/slurm.conf to it when that path is free, so a plain `sbatch` works in a shell.
#
# The nodes are emulated: several slurmd on this host (`slurmd -N nodeX`, one Port each), every one
# declaring NODE_CPUS CPUs (default 4, oversubscribing a small host on purpose: a test job asks for
# one task per node, and torchrun then starts its ranks inside it). node1/node2 resolve to 127.0.0.1
# through lines this script adds to /etc/hosts (a head node that does not resolve makes torchrun's
# rendezvous hang). Requeue is on, and the scheduler is tuned so a requeued job restarts in ~12 s.
#
# Knobs: SLURM_STATE_DIR, SLURM_CTLD_PORT (6917), SLURMD_PORT_BASE (6920), NODE_CPUS (4),
#        SLURM_START_TIMEOUT (60 s to wait for the nodes to become idle).
set -euo pipefail

STATE_DIR=${SLURM_STATE_DIR:-/tmp/diffmoe-slurm}
CTLD_PORT=${SLURM_CTLD_PORT:-6917}
SLURMD_PORT_BASE=${SLURMD_PORT_BASE:-6920}
NODE_CPUS=${NODE_CPUS:-4}
START_TIMEOUT=${SLURM_START_TIMEOUT:-60}
CONF="$STATE_DIR/etc/slurm.conf"
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/run/munge.socket.2"
HOSTS_MARK="# diffmoe-slurm emulated node"

die() {
  echo "slurm_cluster: error: $*" >&2
  exit 1
}
log() { echo "slurm_cluster: $*" >&2; }

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

need_root() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (it starts munged/slurmctld/slurmd and edits /etc/hosts)"
}

# ---- install -------------------------------------------------------------------------------------
cmd_install() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "slurm and munge already installed ($(slurmd -V))"
    return 0
  fi
  need_root
  log "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}"; then
    apt-get update -o DPkg::Lock::Timeout=300 ||
      die "apt-get update failed: cannot install ${missing[*]}"
    apt-get install -y -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" ||
      die "apt-get install ${missing[*]} failed"
  fi
}

# ---- pid-file helpers ----------------------------------------------------------------------------
# pid_alive FILE NAME: the pid in FILE is a live process whose command is NAME (guards against a
# stale pid file pointing at a recycled pid that now belongs to someone else).
pid_alive() {
  local file=$1 name=$2 pid
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/comm ]] || return 1
  [[ $(</proc/"$pid"/comm) == "$name" ]]
}

stop_pid() {
  local file=$1 name=$2 pid i
  if ! pid_alive "$file" "$name"; then
    rm -f "$file"
    return 0
  fi
  pid=$(<"$file")
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    [[ -d /proc/$pid ]] || break
    sleep 0.1
  done
  if [[ -d /proc/$pid ]]; then
    log "$name (pid $pid) ignored SIGTERM for 10 s, sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
  log "stopped $name (pid $pid)"
}

# ---- configuration -------------------------------------------------------------------------------
write_hosts() {
  local n=$1 i tmp
  tmp=$(mktemp)
  grep -vF "$HOSTS_MARK" /etc/hosts >"$tmp" || true
  for ((i = 1; i <= n; i++)); do
    echo "127.0.0.1 node$i $HOSTS_MARK" >>"$tmp"
  done
  # Rewrite in place (not mv): /etc/hosts is often a bind mount inside containers.
  cat "$tmp" >/etc/hosts
  rm -f "$tmp"
}

write_munge_key() {
  mkdir -p "$MUNGE_DIR"/{etc,run,log,lib}
  if [[ ! -s $MUNGE_DIR/etc/munge.key ]]; then
    dd if=/dev/urandom of="$MUNGE_DIR/etc/munge.key" bs=1024 count=1 status=none
  fi
  chown -R munge:munge "$MUNGE_DIR"
  chmod 0755 "$MUNGE_DIR"
  chmod 0700 "$MUNGE_DIR"/{etc,lib,log}
  chmod 0755 "$MUNGE_DIR/run"
  chmod 0600 "$MUNGE_DIR/etc/munge.key"
}

write_conf() {
  local n=$1 host i
  host=$(hostname)
  getent hosts "$host" >/dev/null || die "this host's name '$host' does not resolve (add it to /etc/hosts)"
  mkdir -p "$STATE_DIR"/{etc,log,run,spool,state}
  {
    echo "# Written by tools/slurm_cluster.sh; rewritten on every start."
    echo "ClusterName=diffmoe"
    echo "SlurmctldHost=$host"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # cred_expire=10 + sched_interval=2: a requeued job starts again after ~12 s, not ~2.5 min.
    echo "AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10"
    echo "SchedulerParameters=sched_interval=2"
    echo "JobRequeue=1"
    echo "StateSaveLocation=$STATE_DIR/state"
    echo "SlurmdSpoolDir=$STATE_DIR/spool/%n"
    echo "SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid"
    echo "SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$STATE_DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    # No systemd/cgroup delegation here: track processes by parent pid, no task binding.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "MpiDefault=none"
    echo "MailProg=/bin/true"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    # One line per finished job (state, exit code): tests read it after scontrol forgets the job.
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$STATE_DIR/log/jobcomp.txt"
    echo "MinJobAge=600"
    echo "ReturnToService=2"
    echo "SlurmdTimeout=60"
    echo "InactiveLimit=0"
    echo "KillWait=10"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    # The declared CPUs are trusted even when the host has fewer (emulated nodes).
    echo "SlurmdParameters=config_overrides"
    for ((i = 1; i <= n; i++)); do
      echo "NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((SLURMD_PORT_BASE + i - 1)) CPUs=$NODE_CPUS RealMemory=1000 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  echo "$n" >"$STATE_DIR/etc/num_nodes"
  # A plain `sbatch` (no SLURM_CONF) reads /etc/slurm/slurm.conf: point it here when that is free.
  mkdir -p /etc/slurm
  if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
    ln -sfn "$CONF" /etc/slurm/slurm.conf
  else
    log "/etc/slurm/slurm.conf exists and is not ours: export SLURM_CONF=$CONF for the clients"
  fi
}

# ---- start / stop / status -----------------------------------------------------------------------
running_nodes() { [[ -s $STATE_DIR/etc/num_nodes ]] && cat "$STATE_DIR/etc/num_nodes" || echo 0; }

all_running() {
  local n=$1 i
  pid_alive "$MUNGE_DIR/run/munged.pid" munged || return 1
  pid_alive "$STATE_DIR/run/slurmctld.pid" slurmctld || return 1
  for ((i = 1; i <= n; i++)); do
    pid_alive "$STATE_DIR/run/slurmd-node$i.pid" slurmd || return 1
  done
}

wait_idle() {
  local n=$1 deadline states i
  deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
    local idle=0
    for ((i = 1; i <= n; i++)); do
      if grep -qE "^node$i (idle|mix|alloc)$" <<<"$states"; then
        idle=$((idle + 1))
      elif grep -qE "^node$i (down|drain|drng|fail)\*?$" <<<"$states"; then
        SLURM_CONF=$CONF scontrol update nodename="node$i" state=resume 2>/dev/null || true
      fi
    done
    ((idle == n)) && return 0
    sleep 0.5
  done
  log "nodes not idle after ${START_TIMEOUT}s; sinfo says:"
  SLURM_CONF=$CONF sinfo -N >&2 || true
  log "logs: $STATE_DIR/log/"
  tail -n 5 "$STATE_DIR"/log/*.log >&2 || true
  exit 1
}

cmd_start() {
  local n=$1 i
  need_root
  for bin in munged slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || die "$bin not found: run '$0 install' first"
  done
  if all_running "$n" && [[ $(running_nodes) -eq $n ]]; then
    log "already running with $n node(s) (state in $STATE_DIR)"
    wait_idle "$n"
    return 0
  fi
  if [[ $(running_nodes) -ne 0 && $(running_nodes) -ne $n ]]; then
    log "running with $(running_nodes) node(s), restarting with $n"
    cmd_stop
  fi
  write_hosts "$n"
  write_munge_key
  write_conf "$n"

  if ! pid_alive "$MUNGE_DIR/run/munged.pid" munged; then
    runuser -u munge -- munged \
      --key-file="$MUNGE_DIR/etc/munge.key" --socket="$MUNGE_SOCKET" \
      --pid-file="$MUNGE_DIR/run/munged.pid" --log-file="$MUNGE_DIR/log/munged.log" \
      --seed-file="$MUNGE_DIR/lib/munged.seed" ||
      die "munged failed to start; see $MUNGE_DIR/log/munged.log"
    log "started munged (pid $(<"$MUNGE_DIR/run/munged.pid"))"
  fi
  if ! pid_alive "$STATE_DIR/run/slurmctld.pid" slurmctld; then
    slurmctld -f "$CONF" || die "slurmctld failed to start; see $STATE_DIR/log/slurmctld.log"
    for ((i = 0; i < 50; i++)); do
      pid_alive "$STATE_DIR/run/slurmctld.pid" slurmctld && break
      sleep 0.1
    done
    pid_alive "$STATE_DIR/run/slurmctld.pid" slurmctld ||
      die "slurmctld exited; see $STATE_DIR/log/slurmctld.log"
    log "started slurmctld (pid $(<"$STATE_DIR/run/slurmctld.pid"), port $CTLD_PORT)"
  else
    SLURM_CONF=$CONF scontrol reconfigure || true
  fi
  for ((i = 1; i <= n; i++)); do
    if ! pid_alive "$STATE_DIR/run/slurmd-node$i.pid" slurmd; then
      mkdir -p "$STATE_DIR/spool/node$i"
      slurmd -f "$CONF" -N "node$i" || die "slurmd node$i failed; see $STATE_DIR/log/slurmd-node$i.log"
      log "started slurmd node$i (port $((SLURMD_PORT_BASE + i - 1)))"
    fi
  done
  wait_idle "$n"
  log "cluster up: $n node(s); export SLURM_CONF=$CONF"
}

cmd_stop() {
  need_root
  local f
  for f in "$STATE_DIR"/run/slurmd-*.pid; do
    [[ -e $f ]] && stop_pid "$f" slurmd
  done
  stop_pid "$STATE_DIR/run/slurmctld.pid" slurmctld
  stop_pid "$MUNGE_DIR/run/munged.pid" munged
  if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$CONF" ]]; then
    rm -f /etc/slurm/slurm.conf
  fi
  rm -f "$STATE_DIR/etc/num_nodes"
  return 0
}

cmd_status() {
  [[ -s $CONF ]] || die "no cluster configured under $STATE_DIR (run '$0 start')"
  SLURM_CONF=$CONF sinfo -N -l
}

main() {
  [[ $# -ge 1 ]] || usage 2
  local cmd=$1 nodes=2
  shift
  while [[ $# -gt 0 ]]; do
    case $1 in
      --nodes)
        [[ $# -ge 2 ]] || die "--nodes needs a value (1 or 2)"
        nodes=$2
        shift 2
        ;;
      --nodes=*)
        nodes=${1#--nodes=}
        shift
        ;;
      -h | --help) usage 0 ;;
      *) die "unknown argument '$1' (try --help)" ;;
    esac
  done
  [[ $nodes =~ ^[12]$ ]] || die "--nodes must be 1 or 2, got '$nodes'"
  case $cmd in
    install) cmd_install ;;
    start) cmd_start "$nodes" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    -h | --help | help) usage 0 ;;
    *) die "unknown command '$cmd' (install|start|stop|status|env)" ;;
  esac
}

main "$@"
