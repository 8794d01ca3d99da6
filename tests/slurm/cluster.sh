#!/usr/bin/env bash
# A Slurm cluster on this machine, for the launcher's tests: one node, or several "nodes" that are
# each their own slurmd on this host.
#
#   tests/slurm/cluster.sh start             # one node "localhost" with all of this machine's cores
#   tests/slurm/cluster.sh start --nodes 2   # nodes slurm-node1, slurm-node2 (partition "debug" over both)
#   tests/slurm/cluster.sh stop              # cancel the jobs, stop the daemons by process id, undo /etc/hosts
#   tests/slurm/cluster.sh env               # print the SLURM_CONF line clients need
#
# start installs slurm-wlm and munge from Debian's packages when they are missing (needs root), then
# starts the cluster's own munged (its own key and socket in the state folder: the machine's munge is
# neither used nor changed), slurmctld and one slurmd per node (`slurmd -N NAME`, each on its own port).
# With several nodes, each node is pinned to its own share of the cores (taskset) and declares that
# many CPUs, and the node names are added to /etc/hosts (127.0.0.1, one marked line) so that a job's
# rendezvous address, the first host of its node list, resolves. The ports are the first free ones from
# 6817 (as `ss` sees them) and the job ids start at a random number, so that test clusters can run side by
# side. stop waits for the cancelled jobs to end, stops the daemons, kills by process id whatever of the
# cluster is left (step daemons, tasks) and removes the /etc/hosts line; a start that fails stops what it
# had started.
#
# State, logs and the generated slurm.conf live in $SLURM_TEST_DIR (default /tmp/attention-transfer-slurm).
# Clients (sbatch, squeue, scontrol, submitit) find the cluster through SLURM_CONF=$SLURM_TEST_DIR/slurm.conf.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${SLURM_TEST_DIR:-/tmp/attention-transfer-slurm}"
conf="$state/slurm.conf"
hosts_mark="# added by attention-transfer tests/slurm/cluster.sh for $state"
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

port_free() {
  [ -z "$(ss -Htln "( sport = :$1 )" 2>/dev/null)" ]
}

# $1 free TCP ports from 6817 up (Slurm's default ports when they are free), one per line
free_ports() {
  local want="$1" port=6817 found=0
  while [ "$found" -lt "$want" ] && [ "$port" -lt 7817 ]; do
    if port_free "$port"; then
      echo "$port"
      found=$((found + 1))
    fi
    port=$((port + 1))
  done
  [ "$found" -eq "$want" ] || { echo "no $want free ports between 6817 and 7817" >&2; return 1; }
}

node_names() {
  local n="$1"
  if [ "$n" -eq 1 ]; then
    echo localhost
  else
    seq -f 'slurm-node%g' 1 "$n"
  fi
}

write_config() {
  local n="$1" cpus mem names ports i
  cpus=$(env -u OMP_NUM_THREADS nproc)  # nproc reads OMP_NUM_THREADS, which a test run may set
  mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  names=$(node_names "$n")
  mapfile -t ports < <(free_ports $((n + 1)))
  mkdir -p "$state/ctld" "$state/spool"
  echo "$names" > "$state/nodes"
  sed -e "s#@STATE@#$state#g" -e "s#@CTLD_PORT@#${ports[0]}#g" -e "s#@FIRST_JOB_ID@#$((RANDOM * 32 + 1))#g" \
    "$here/slurm.conf.in" > "$conf"
  i=0
  for name in $names; do
    i=$((i + 1))
    if [ "$n" -eq 1 ]; then
      echo "NodeName=$name NodeAddr=127.0.0.1 Port=${ports[$i]} CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    else
      echo "NodeName=$name NodeHostname=localhost NodeAddr=127.0.0.1 Port=${ports[$i]}" \
           "CPUs=$(node_cpu_count "$n") RealMemory=$((mem / n)) State=UNKNOWN"
    fi
  done >> "$conf"
  echo "PartitionName=debug Nodes=$(echo "$names" | paste -sd,) Default=YES MaxTime=INFINITE State=UP" \
       "OverSubscribe=YES" >> "$conf"
  # an empty cgroup.conf keeps slurmd from looking for cgroup support it does not use here
  : > "$state/cgroup.conf"
}

# the CPUs this process may run on, one per line (e.g. "0-1,4" -> 0 1 4)
allowed_cpus() {
  local range
  for range in $(awk '/^Cpus_allowed_list/ {print $2}' /proc/self/status | tr ',' ' '); do
    seq "${range%-*}" "${range#*-}"
  done
}

# CPUs of each of $1 nodes: an equal share of the allowed cores, at least one
node_cpu_count() {
  local share=$(( $(allowed_cpus | wc -l) / $1 ))
  echo $(( share > 0 ? share : 1 ))
}

# the cores node $2 (1-based) of $1 is pinned to, as a taskset list; empty when the nodes must share
node_cpu_list() {
  local n="$1" i="$2" share
  share=$(( $(allowed_cpus | wc -l) / n ))
  [ "$share" -gt 0 ] || return 0
  allowed_cpus | sed -n "$(( (i - 1) * share + 1 )),$(( i * share ))p" | paste -sd,
}

start_munge() {
  local dir="$state/munge"
  mkdir -p "$dir"
  chmod 700 "$dir"
  if [ ! -s "$dir/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$dir/munge.key"
  munged --force --socket "$dir/munge.socket" --key-file "$dir/munge.key" --pid-file "$state/munged.pid" \
    --log-file "$dir/munged.log" --seed-file "$dir/munged.seed"
}

add_hosts() {
  local names
  names=$(grep -vx localhost "$state/nodes" | paste -sd' ' || true)
  [ -n "$names" ] || return 0
  (
    flock 9
    cp /etc/hosts "$state/hosts.before"
    # a file without a final newline gets one, so that the added line stands alone
    if [ -s /etc/hosts ] && [ -n "$(tail -c 1 /etc/hosts)" ]; then echo >> /etc/hosts; fi
    printf '127.0.0.1 %s %s\n' "$names" "$hosts_mark" >> /etc/hosts
    cp /etc/hosts "$state/hosts.after"
  ) 9</etc/hosts
}

# /etc/hosts as it was before start when nobody else changed it since, else without the marked line;
# rewritten in place (not renamed over), as /etc/hosts may be a mount point
remove_hosts() {
  grep -qF "$hosts_mark" /etc/hosts 2>/dev/null || { rm -f "$state"/hosts.before "$state"/hosts.after; return 0; }
  (
    flock 9
    if [ -f "$state/hosts.before" ] && cmp -s /etc/hosts "$state/hosts.after"; then
      cat "$state/hosts.before" > /etc/hosts
    else
      grep -vF "$hosts_mark" /etc/hosts > "$state/hosts.kept" || true
      cat "$state/hosts.kept" > /etc/hosts
      rm -f "$state/hosts.kept"
    fi
  ) 9</etc/hosts
  rm -f "$state"/hosts.before "$state"/hosts.after
}

wait_idle() {
  local n="$1"
  for _ in $(seq 1 120); do
    if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 == "idle"' | sort -u | wc -l)" -eq "$n" ]; then
      return 0
    fi
    sleep 0.5
  done
  echo "the nodes did not become idle; logs in $state" >&2
  sinfo -N -l >&2 || true
  tail -n 20 "$state"/slurmctld.log "$state"/slurmd-*.log >&2 || true
  return 1
}

# stop the daemons named by these pid files together: TERM, up to 5 s to exit, then KILL
stop_pidfiles() {
  local file pid pids=()
  for file in "$@"; do
    if [ -s "$file" ]; then
      pid=$(cat "$file")
      if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        pids+=("$pid")
      fi
    fi
  done
  for _ in $(seq 1 20); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" -eq 1 ] || break
    sleep 0.25
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -f "$@"
}

# process ids of what this cluster's slurmd started and that is still running: step daemons and job tasks,
# recognised by the SLURM_CONF they inherited
cluster_processes() {
  local dir environ
  for dir in /proc/[0-9]*; do
    [ "${dir#/proc/}" != $$ ] || continue
    environ=$( { tr '\0' '\n' < "$dir/environ"; } 2>/dev/null ) || continue
    grep -qxF "SLURM_CONF=$conf" <<< "$environ" || continue
    if grep -q '^SLURM_JOB_ID=' <<< "$environ" \
        || { tr '\0' ' ' < "$dir/cmdline"; } 2>/dev/null | grep -q '^slurmstepd'; then
      echo "${dir#/proc/}"
    fi
  done
}

stop_cluster() {
  # running jobs first, so that no task outlives the daemons: cancelled, then up to KillWait + 10 s to end
  if [ -f "$conf" ] && [ -s "$state/slurmctld.pid" ] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null; then
    scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 80); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.25
    done
  fi
  stop_pidfiles "$state"/slurmd-*.pid "$state/slurmctld.pid"
  # what did not end with its job (its daemons gone): by process id
  local pid leftovers
  leftovers=$(cluster_processes)
  for pid in $leftovers; do kill -9 "$pid" 2>/dev/null || true; done
  stop_pidfiles "$state/munged.pid"
  remove_hosts
}

start_cluster() {
  local n="$1" i=0 cpus
  install_if_missing
  mkdir -p "$state"
  write_config "$n"
  start_munge
  add_hosts
  slurmctld -c -f "$conf"
  for name in $(cat "$state/nodes"); do
    i=$((i + 1))
    cpus=""
    [ "$n" -gt 1 ] && cpus=$(node_cpu_list "$n" "$i")
    if [ -n "$cpus" ]; then
      taskset -c "$cpus" slurmd -f "$conf" -N "$name"
    else
      slurmd -f "$conf" -N "$name"
    fi
  done
  wait_idle "$n"
}

case "${1:-}" in
  start)
    nodes=1
    if [ "${2:-}" = "--nodes" ]; then
      nodes="${3:-}"
    elif [ -n "${2:-}" ]; then
      echo "usage: $0 start [--nodes N]" >&2
      exit 2
    fi
    if ! [[ "$nodes" =~ ^[1-9][0-9]*$ ]]; then
      echo "--nodes $nodes: give a number of nodes >= 1" >&2
      exit 2
    fi
    # a start that fails leaves nothing running and /etc/hosts as it was
    trap 'rc=$?; stop_cluster >/dev/null 2>&1 || true; exit $rc' EXIT
    start_cluster "$nodes"
    trap - EXIT
    pids=""
    for name in $(cat "$state/nodes"); do pids="$pids $name:$(cat "$state/slurmd-$name.pid")"; done
    echo "cluster up: munged $(cat "$state/munged.pid"), slurmctld $(cat "$state/slurmctld.pid"), slurmd$pids;" \
         "SLURM_CONF=$conf"
    ;;
  stop)
    stop_cluster
    echo "cluster stopped"
    ;;
  env)
    echo "SLURM_CONF=$conf"
    ;;
  *)
    echo "usage: $0 start [--nodes N] | stop | env" >&2
    exit 2
    ;;
esac
