#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by slurm/start_local_cluster.sh.
#
#   sudo slurm/stop_local_cluster.sh           # cancel jobs, stop all daemons, keep state (job history)
#   sudo slurm/stop_local_cluster.sh --purge   # also delete the state directory
#
# Uses the same MTSSL_SLURM_STATE as the start script (default /tmp/mtssl-slurm). Only the
# processes whose pid files live in that state directory are stopped.
set -euo pipefail

STATE_DIR=${MTSSL_SLURM_STATE:-/tmp/mtssl-slurm}
SYSTEM_CONF=/etc/slurm/slurm.conf
STATE_MARKER=.mtssl-slurm-state
PURGE=0

die() { echo "stop_local_cluster: error: $*" >&2; exit 1; }
log() { echo "stop_local_cluster: $*"; }

for arg in "$@"; do
    case $arg in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) die "unknown argument '$arg'; the only option is --purge." ;;
    esac
done
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
stop_daemon "$STATE_DIR/run/slurmctld.pid" slurmctld
stop_daemon "$STATE_DIR/run/slurmdbd.pid" slurmdbd
stop_daemon "$STATE_DIR/mysql/mysqld.pid" mariadbd
stop_daemon "$STATE_DIR/munge/munged.pid" munged

# Remove /etc/slurm/slurm.conf only if it is the link the start script made.
if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$STATE_DIR/etc/slurm.conf" ]]; then
    rm -f "$SYSTEM_CONF"
fi

if (( PURGE )); then
    rm -rf "$STATE_DIR"
    log "removed $STATE_DIR"
fi
log "local cluster stopped"
