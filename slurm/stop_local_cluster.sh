#!/usr/bin/env bash
# Stop a local SLURM cluster started by slurm/start_local_cluster.sh.
#
#   sudo slurm/stop_local_cluster.sh                  # cancel jobs, stop all daemons, keep state (job history)
#   sudo slurm/stop_local_cluster.sh --purge          # also delete the state directory
#   sudo slurm/stop_local_cluster.sh --nodes 2 [...]  # the cluster of start_local_cluster.sh --nodes 2
#
# Uses the same MTSSL_SLURM_STATE as the start script (default /tmp/mtssl-slurm, /tmp/mtssl-slurmN with
# --nodes N). Only the processes whose pid files live in that state directory are stopped; for a
# multi-node cluster also what is left in its nodes' network namespaces (job processes), then the
# namespaces and links the start script recorded in <state>/network.
set -euo pipefail

SYSTEM_CONF=/etc/slurm/slurm.conf
STATE_MARKER=.mtssl-slurm-state
PURGE=0
NODES=1

die() { echo "stop_local_cluster: error: $*" >&2; exit 1; }
log() { echo "stop_local_cluster: $*"; }

while (( $# )); do
    case $1 in
        --purge) PURGE=1; shift ;;
        --nodes) (( $# >= 2 )) || die "--nodes needs a number of nodes, e.g. --nodes 2."; NODES=$2; shift 2 ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) die "unknown argument '$1'; the options are --purge and --nodes N." ;;
    esac
done
[[ $NODES =~ ^[1-9]$ ]] || die "--nodes '$NODES' is not a number of nodes from 1 to 9."
if (( NODES == 1 )); then
    STATE_DIR=${MTSSL_SLURM_STATE:-/tmp/mtssl-slurm}
else
    STATE_DIR=${MTSSL_SLURM_STATE:-/tmp/mtssl-slurm$NODES}
fi
[[ $(id -u) == 0 ]] || die "must run as root; rerun with sudo."
if [[ ! -e $STATE_DIR/$STATE_MARKER ]]; then
    log "no local cluster state in $STATE_DIR; nothing to stop."
    exit 0
fi
export SLURM_CONF="$STATE_DIR/etc/slurm.conf"

# Pid from file $1 if it is a live process named $2 (guards against reused pids).
live_pid() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(tr -dc 0-9 <"$1")
    [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$2" ]] && echo "$pid"
}

# stop_daemon PIDFILE NAME: SIGTERM, wait up to 30 s, then SIGKILL.
stop_daemon() {
    local pid i
    pid=$(live_pid "$1" "$2") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do
        [[ -d /proc/$pid ]] || { log "stopped $2"; return 0; }
        sleep 0.5
    done
    log "$2 (pid $pid) ignored SIGTERM for 30 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

# Cancel jobs first: with proctrack/linuxproc their processes would outlive slurmd.
if live_pid "$STATE_DIR/run/slurmctld.pid" slurmctld >/dev/null; then
    jobs=$(timeout 10 squeue --noheader --format=%A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: ${jobs//$'\n'/ }"
        # shellcheck disable=SC2086  # one argument per job id
        timeout 10 scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            [[ -z $(timeout 10 squeue --noheader --format=%A 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
fi

stop_daemon "$STATE_DIR/run/slurmd.pid" slurmd
for pid_file in "$STATE_DIR"/nodes/*/slurmd.pid; do
    [[ -e $pid_file ]] && stop_daemon "$pid_file" slurmd
done

stop_daemon "$STATE_DIR/run/slurmctld.pid" slurmctld
stop_daemon "$STATE_DIR/run/slurmdbd.pid" slurmdbd
stop_daemon "$STATE_DIR/mysql/mysqld.pid" mariadbd
stop_daemon "$STATE_DIR/munge/munged.pid" munged

# What the start script made for the nodes (start_local_cluster.sh --nodes N), once no daemon uses it:
# processes still in their network namespaces (job steps that outlived their slurmd), this machine's ends of
# the links (each takes its peer along), the namespaces (with the links between nodes), and last the route
# that keeps the range's packets on this machine.
if [[ -s $STATE_DIR/network ]]; then
    while read -r kind name; do
        [[ $kind == netns && -e /run/netns/$name ]] || continue
        pids=$(ip netns pids "$name" 2>/dev/null || true)
        [[ -n $pids ]] || continue
        log "killing processes left in $name: ${pids//$'\n'/ }"
        # shellcheck disable=SC2086  # one argument per pid
        kill -KILL $pids 2>/dev/null || true
        for ((i = 0; i < 20; i++)); do
            [[ -z $(ip netns pids "$name" 2>/dev/null) ]] && break
            sleep 0.5
        done
    done <"$STATE_DIR/network"
    while read -r kind name; do
        if [[ $kind == link ]] && ip link show dev "$name" >/dev/null 2>&1; then
            ip link delete "$name" && log "removed link $name"
        fi
    done <"$STATE_DIR/network"
    while read -r kind name; do
        if [[ $kind == netns && -e /run/netns/$name ]]; then
            ip netns delete "$name" && log "removed network namespace $name"
        fi
    done <"$STATE_DIR/network"
    while read -r kind type prefix; do
        if [[ $kind == route && -n $(ip -4 route show type "$type" "$prefix") ]]; then
            ip route delete "$type" "$prefix" && log "removed route $type $prefix"
        fi
    done <"$STATE_DIR/network"
    rm -f "$STATE_DIR/network"
fi


# Remove /etc/slurm/slurm.conf only if it is the link the start script made.
if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$STATE_DIR/etc/slurm.conf" ]]; then
    rm -f "$SYSTEM_CONF"
fi

if (( PURGE )); then
    rm -rf "$STATE_DIR"
    log "removed $STATE_DIR"
fi
log "local cluster stopped"
