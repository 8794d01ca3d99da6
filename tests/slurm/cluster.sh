#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the launcher's tests.
#
#   tests/slurm/cluster.sh start   # install slurm-wlm + munge if missing (root), start munged, slurmctld, slurmd
#   tests/slurm/cluster.sh stop    # stop them by process id
#   tests/slurm/cluster.sh env     # print the SLURM_CONF line clients need
#
# State, logs and the generated slurm.conf live in $SLURM_TEST_DIR (default /tmp/attention-transfer-slurm).
# Clients (sbatch, squeue, scontrol, submitit) find the cluster through SLURM_CONF=$SLURM_TEST_DIR/slurm.conf.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${SLURM_TEST_DIR:-/tmp/attention-transfer-slurm}"
conf="$state/slurm.conf"
export SLURM_CONF="$conf"

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "slurm-wlm and munge are not installed and this is not root: cannot start a test cluster" >&2
    exit 3
  fi
  echo "installing slurm-wlm and munge from Debian's packages ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  mkdir -p "$state/ctld" "$state/spool"
  sed -e "s#@STATE@#$state#g" -e "s#@CPUS@#$cpus#g" -e "s#@MEMORY_MB@#$mem#g" "$here/slurm.conf.in" > "$conf"
  # an empty cgroup.conf keeps slurmd from looking for cgroup support it does not use here
  : > "$state/cgroup.conf"
}

start_munge() {
  if pgrep -x munged >/dev/null; then
    return
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  munged --force --pid-file "$state/munged.pid"
  echo "$state/munged.pid" > "$state/munged.started-by-us"
}

wait_idle() {
  for _ in $(seq 1 60); do
    if [ "$(sinfo -h -N -o %T 2>/dev/null | head -n1)" = "idle" ]; then
      return 0
    fi
    sleep 0.5
  done
  echo "the node did not become idle; logs in $state" >&2
  sinfo -N -l >&2 || true
  tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2 || true
  return 1
}

stop_pidfile() {
  local file="$1"
  if [ -s "$file" ]; then
    local pid
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
  fi
}

case "${1:-}" in
  start)
    install_if_missing
    mkdir -p "$state"
    write_config
    start_munge
    slurmctld -c -f "$conf"
    slurmd -f "$conf" -N localhost
    wait_idle
    echo "cluster up: slurmctld $(cat "$state/slurmctld.pid"), slurmd $(cat "$state/slurmd.pid"); SLURM_CONF=$conf"
    ;;
  stop)
    # running jobs first, so that no task outlives the daemons
    scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
    stop_pidfile "$state/slurmd.pid"
    stop_pidfile "$state/slurmctld.pid"
    if [ -f "$state/munged.started-by-us" ]; then
      stop_pidfile "$state/munged.pid"
      rm -f "$state/munged.started-by-us"
    fi
    echo "cluster stopped"
    ;;
  env)
    echo "SLURM_CONF=$conf"
    ;;
  *)
    echo "usage: $0 start|stop|env" >&2
    exit 2
    ;;
esac
