#!/usr/bin/env bash
# Start a one-node SLURM cluster on localhost, with real accounting, for tests and local trials.
#
#   sudo slurm/start_local_cluster.sh          # installs missing Debian packages, starts, waits
#   source /tmp/mtssl-slurm/env.sh             # optional: SLURM_CONF etc. for this shell
#   sudo slurm/stop_local_cluster.sh [--purge]
#
# Runs munged (as user munge, private socket), a private MariaDB on 127.0.0.1, slurmdbd,
# slurmctld and slurmd, all in the background; everything lives in one state directory.
# Calling it again while the cluster is up only starts what is missing.
#
# Environment:
#   MTSSL_SLURM_STATE          state directory (default /tmp/mtssl-slurm)
#   MTSSL_SLURM_PORT_BASE      slurmctld port; slurmd, slurmdbd, MariaDB use the next three (default 6817)
#   MTSSL_SLURM_CPUS           CPUs of the node (default: nproc, at least 2)
#   MTSSL_SLURM_CLUSTER        cluster name (default mtssl)
#   MTSSL_SLURM_LINK_CONF      1 (default): link /etc/slurm/slurm.conf to the generated config
#                              so sbatch/squeue/sacct work without SLURM_CONF; 0: never touch /etc
#   MTSSL_SLURM_START_TIMEOUT  seconds to wait for each daemon (default 60)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATE_DIR="$SCRIPT_DIR/local_cluster"
STATE_DIR=${MTSSL_SLURM_STATE:-/tmp/mtssl-slurm}
PORT_BASE=${MTSSL_SLURM_PORT_BASE:-6817}
CLUSTER_NAME=${MTSSL_SLURM_CLUSTER:-mtssl}
LINK_CONF=${MTSSL_SLURM_LINK_CONF:-1}
START_TIMEOUT=${MTSSL_SLURM_START_TIMEOUT:-60}
SYSTEM_CONF=/etc/slurm/slurm.conf
STATE_MARKER=.mtssl-slurm-state
PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client slurm-wlm)

die() { echo "start_local_cluster: error: $*" >&2; exit 1; }
log() { echo "start_local_cluster: $*"; }

[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons); rerun with sudo."
[[ $PORT_BASE =~ ^[0-9]+$ ]] || die "MTSSL_SLURM_PORT_BASE='$PORT_BASE' is not a port number; set e.g. 6817."
[[ $START_TIMEOUT =~ ^[0-9]+$ ]] \
    || die "MTSSL_SLURM_START_TIMEOUT='$START_TIMEOUT' is not a number of seconds."
if [[ -n ${MTSSL_SLURM_CPUS:-} ]]; then
    [[ $MTSSL_SLURM_CPUS =~ ^[1-9][0-9]*$ ]] \
        || die "MTSSL_SLURM_CPUS='$MTSSL_SLURM_CPUS' is not a positive integer."
    CPUS=$MTSSL_SLURM_CPUS
else
    CPUS=$(nproc)
    (( CPUS >= 2 )) || CPUS=2  # 2-task test jobs need 2 CPUs; config_overrides allows more than exist.
fi

SLURMCTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
SLURMDBD_PORT=$((PORT_BASE + 2))
MYSQL_PORT=$((PORT_BASE + 3))
HOST=$(hostname -s 2>/dev/null || true)
HOST=${HOST:-localhost}
ETC="$STATE_DIR/etc"
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MYSQL_DIR="$STATE_DIR/mysql"
MYSQL_SOCKET="$MYSQL_DIR/mysqld.sock"
export SLURM_CONF="$ETC/slurm.conf"
T0=$EPOCHREALTIME

elapsed() { awk -v t0="$T0" -v t1="$EPOCHREALTIME" 'BEGIN { printf "%.1f", t1 - t0 }'; }

# True when the pid in file $1 is a live process named $2 (guards against reused pids).
running() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(tr -dc 0-9 <"$1")
    [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$2" ]]
}

# spawn CONSOLE_LOG COMMAND...: start a daemon without handing it our stdio or the start lock
# (fd 9), so callers that capture our output are not kept waiting and the lock is released.
spawn() {
    local console=$1; shift
    "$@" 9>&- </dev/null >>"$console" 2>&1
}

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.5 s.
wait_for() {
    local timeout=$1 what=$2; shift 2
    local deadline=$(( $(date +%s) + timeout ))
    until "$@" >/dev/null 2>&1; do
        (( $(date +%s) < deadline )) || return 1
        sleep 0.5
    done
    log "$what is up ($(elapsed) s)"
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    (( ${#missing[@]} == 0 )) && return 0
    log "installing ${missing[*]} with apt-get"
    # Keep package scripts from starting the system munge/mariadb services; we run private ones.
    local policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    local rc=0
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300)
    { "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "${missing[@]}"; } \
        >"/tmp/mtssl-slurm-apt.log" 2>&1 || rc=$?
    (( rc == 0 )) || die "apt-get install ${missing[*]} failed; see /tmp/mtssl-slurm-apt.log."
    log "packages installed ($(elapsed) s)"
}

# render TEMPLATE DEST: copy a template, replacing every {{NAME}} by its value.
render() {
    local tmp="$2.tmp"
    sed -e "s|{{STATE_DIR}}|$STATE_DIR|g" \
        -e "s|{{CLUSTER_NAME}}|$CLUSTER_NAME|g" \
        -e "s|{{HOST}}|$HOST|g" \
        -e "s|{{CPUS}}|$CPUS|g" \
        -e "s|{{REAL_MEMORY_MB}}|$REAL_MEMORY_MB|g" \
        -e "s|{{SLURMCTLD_PORT}}|$SLURMCTLD_PORT|g" \
        -e "s|{{SLURMD_PORT}}|$SLURMD_PORT|g" \
        -e "s|{{SLURMDBD_PORT}}|$SLURMDBD_PORT|g" \
        -e "s|{{MYSQL_PORT}}|$MYSQL_PORT|g" \
        -e "s|{{MYSQL_PASSWORD}}|$MYSQL_PASSWORD|g" \
        -e "s|{{MUNGE_SOCKET}}|$MUNGE_SOCKET|g" \
        "$1" >"$tmp"
    if grep -q '{{' "$tmp"; then
        die "unreplaced placeholder in $1: $(grep -o '{{[A-Z_]*}}' "$tmp" | head -1)"
    fi
    mv "$tmp" "$2"
}

prepare_state_dir() {
    if [[ -e $STATE_DIR && ! -e $STATE_DIR/$STATE_MARKER && -n $(ls -A "$STATE_DIR") ]]; then
        die "$STATE_DIR exists and is not a local cluster state dir; set MTSSL_SLURM_STATE to a new path."
    fi
    mkdir -p "$STATE_DIR" "$ETC" "$STATE_DIR/run" "$STATE_DIR/log" "$STATE_DIR/slurmctld" \
        "$STATE_DIR/slurmd" "$MUNGE_DIR" "$MYSQL_DIR"
    touch "$STATE_DIR/$STATE_MARKER"
    chmod 755 "$STATE_DIR"
    chown munge:munge "$MUNGE_DIR"; chmod 755 "$MUNGE_DIR"
    chown mysql:mysql "$MYSQL_DIR"; chmod 750 "$MYSQL_DIR"
}

write_configs() {
    REAL_MEMORY_MB=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    if [[ ! -s $ETC/mysql_password ]]; then
        (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$ETC/mysql_password")
    fi
    MYSQL_PASSWORD=$(cat "$ETC/mysql_password")
    render "$TEMPLATE_DIR/slurm.conf" "$ETC/slurm.conf"
    (umask 077; render "$TEMPLATE_DIR/slurmdbd.conf" "$ETC/slurmdbd.conf")
    chmod 600 "$ETC/slurmdbd.conf"  # slurmdbd refuses a world-readable config (it holds a password)
    render "$TEMPLATE_DIR/mariadb.cnf" "$ETC/mariadb.cnf"
    chmod 644 "$ETC/slurm.conf" "$ETC/mariadb.cnf"
}

link_system_conf() {
    [[ $LINK_CONF == 1 ]] || return 0
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    # Replace only a missing file, a dangling link, or a link into some local cluster state dir.
    local target
    target=$(readlink "$SYSTEM_CONF" 2>/dev/null || true)
    if [[ ! -e $SYSTEM_CONF ]] || [[ -n $target && -e $(dirname "$(dirname "$target")")/$STATE_MARKER ]]; then
        ln -sfn "$ETC/slurm.conf" "$SYSTEM_CONF"
        return 0
    fi
    log "warning: $SYSTEM_CONF belongs to another setup; left alone. Export SLURM_CONF=$ETC/slurm.conf (see env.sh)."
}

start_munge() {
    if ! running "$MUNGE_DIR/munged.pid" munged; then
        if [[ ! -s $MUNGE_DIR/munge.key ]]; then
            runuser -u munge -- mungekey --create --keyfile="$MUNGE_DIR/munge.key"
        fi
        rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
        spawn "$MUNGE_DIR/console.log" runuser -u munge -- munged --socket="$MUNGE_SOCKET" \
            --key-file="$MUNGE_DIR/munge.key" --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
            --seed-file="$MUNGE_DIR/munged.seed" \
            || die "munged failed to start; see $MUNGE_DIR/munged.log."
    fi
    wait_for "$START_TIMEOUT" munged bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" \
        || die "munged does not answer on $MUNGE_SOCKET; see $MUNGE_DIR/munged.log."
}

mysql_root() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -uroot "$@"; }

start_mariadb() {
    if [[ ! -d $MYSQL_DIR/data/mysql ]]; then
        rm -rf "$MYSQL_DIR/data"
        mariadb-install-db --defaults-file="$ETC/mariadb.cnf" --auth-root-authentication-method=socket \
            --skip-test-db >"$MYSQL_DIR/install.log" 2>&1 \
            || die "mariadb-install-db failed; see $MYSQL_DIR/install.log."
    fi
    if ! running "$MYSQL_DIR/mysqld.pid" mariadbd; then
        # mariadbd does not daemonize itself: detach it from this shell so it outlives it.
        spawn "$MYSQL_DIR/console.log" setsid --fork mariadbd --defaults-file="$ETC/mariadb.cnf"
    fi
    wait_for "$START_TIMEOUT" MariaDB mysql_root -e "SELECT 1" \
        || die "MariaDB did not start; see $MYSQL_DIR/mariadb.log."
    local host
    for host in localhost 127.0.0.1; do
        mysql_root -e "CREATE USER IF NOT EXISTS 'slurm'@'$host' IDENTIFIED BY '$MYSQL_PASSWORD';
                       ALTER USER 'slurm'@'$host' IDENTIFIED BY '$MYSQL_PASSWORD';
                       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'$host';"
    done
}

sacctmgr_q() { timeout 20 sacctmgr --noheader --parsable2 "$@"; }

start_slurmdbd() {
    running "$STATE_DIR/run/slurmdbd.pid" slurmdbd || spawn "$STATE_DIR/log/console.log" slurmdbd \
        || die "slurmdbd failed to start; see $STATE_DIR/log/slurmdbd.log and console.log."
    wait_for "$START_TIMEOUT" slurmdbd sacctmgr_q show cluster \
        || die "slurmdbd does not answer; see $STATE_DIR/log/slurmdbd.log."
    # Cluster, account and user must exist before slurmctld registers.
    [[ -n $(sacctmgr_q show cluster "$CLUSTER_NAME" format=Cluster) ]] \
        || sacctmgr_q -i add cluster "$CLUSTER_NAME" >/dev/null
    [[ -n $(sacctmgr_q show account mtssl format=Account) ]] \
        || sacctmgr_q -i add account mtssl Cluster="$CLUSTER_NAME" Description="mtssl local tests" \
            Organization=mtssl >/dev/null
    [[ -n $(sacctmgr_q show assoc where user=root account=mtssl cluster="$CLUSTER_NAME" format=User) ]] \
        || sacctmgr_q -i add user root Account=mtssl Cluster="$CLUSTER_NAME" >/dev/null
}

node_state() { timeout 10 sinfo --noheader --Node --nodes="$HOST" --format=%T 2>/dev/null | head -1; }

node_ready() {
    local state
    state=$(node_state)
    case $state in
        idle|mixed|allocated|completing) return 0 ;;
        down*|drain*) timeout 10 scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 ;;
    esac
    return 1
}

controller_registered() {
    [[ -n $(sacctmgr_q show cluster "$CLUSTER_NAME" format=ControlHost) ]] \
        && timeout 20 sacct --noheader --allusers --starttime=now-1hours >/dev/null
}

start_slurm() {
    running "$STATE_DIR/run/slurmctld.pid" slurmctld || spawn "$STATE_DIR/log/console.log" slurmctld \
        || die "slurmctld failed to start; see $STATE_DIR/log/slurmctld.log and console.log."
    wait_for "$START_TIMEOUT" slurmctld timeout 10 scontrol ping \
        || die "slurmctld does not answer; see $STATE_DIR/log/slurmctld.log."
    running "$STATE_DIR/run/slurmd.pid" slurmd || spawn "$STATE_DIR/log/console.log" slurmd -N "$HOST" \
        || die "slurmd failed to start; see $STATE_DIR/log/slurmd.log and console.log."
    wait_for "$START_TIMEOUT" "node $HOST" node_ready \
        || die "node $HOST is '$(node_state)', not idle; see $STATE_DIR/log/slurmd.log and slurmctld.log."
    wait_for "$START_TIMEOUT" "accounting (sacct)" controller_registered \
        || die "slurmctld did not register with slurmdbd; see $STATE_DIR/log/slurmctld.log and slurmdbd.log."
}

write_env_file() {
    cat >"$STATE_DIR/env.sh" <<EOF
# Source this file to talk to the local SLURM cluster (written by slurm/start_local_cluster.sh).
export SLURM_CONF=$ETC/slurm.conf
export MTSSL_SLURM_STATE=$STATE_DIR
export MTSSL_SLURM_CLUSTER=$CLUSTER_NAME
EOF
}

install_packages
prepare_state_dir
exec 9>"$STATE_DIR/start.lock"
flock -w 600 9 || die "another start_local_cluster.sh holds $STATE_DIR/start.lock for 10 minutes."
# (a concurrent second call waits here, then finds everything running)
write_configs
link_system_conf
start_munge
start_mariadb
start_slurmdbd
start_slurm
write_env_file
log "cluster '$CLUSTER_NAME' ready in $(elapsed) s: node $HOST, $CPUS CPUs, partitions low (default) and high"
echo "export SLURM_CONF=$ETC/slurm.conf"
echo "export MTSSL_SLURM_STATE=$STATE_DIR"
