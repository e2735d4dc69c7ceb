#!/usr/bin/env bash
# Start a local SLURM cluster, with real accounting, for tests and local trials: one node on localhost,
# or N nodes on this machine, each in its own network namespace.
#
#   sudo slurm/start_local_cluster.sh              # one node: installs missing Debian packages, starts, waits
#   source /tmp/mtssl-slurm/env.sh                 # optional: SLURM_CONF etc. for this shell
#   sudo slurm/stop_local_cluster.sh [--purge]
#
#   sudo slurm/start_local_cluster.sh --nodes 2    # nodes node1 and node2 (state /tmp/mtssl-slurm2, ports 6917-6920)
#   source /tmp/mtssl-slurm2/env.sh                # SLURM_CONF of that cluster (it never links /etc/slurm/slurm.conf)
#   sudo slurm/stop_local_cluster.sh --nodes 2 [--purge]
#
# Runs munged (as user munge, private socket), a private MariaDB on 127.0.0.1, slurmdbd,
# slurmctld and slurmd, all in the background; everything lives in one state directory.
# Calling it again while the cluster is up only starts what is missing.
#
# With --nodes N (2-9) each node nodeI is a network namespace with its own host name (a UTS namespace),
# its own /etc/hosts (a mount namespace binds the state dir's nodes/nodeI/hosts over it), spool and log,
# running its own slurmd; munged, MariaDB, slurmdbd and slurmctld stay in this machine's namespace, and
# the file system is shared, as on a cluster with a shared home. The links are point-to-point veth pairs,
# without bridge or forwarding: one from this machine (the controller, address NET.1) to each node, and one
# between every two nodes. Node I has the address NET.(10+I) on all of its links. Each node's hosts file
# maps the other nodes' names to their addresses and, as Debian's default /etc/hosts does, the node's own
# name to 127.0.1.1: a job that lets gloo bind the address of its host name cannot reach the other nodes.
# Traffic stays on these links and addresses. Exit status 3: network namespaces cannot be made here.
#
# Environment:
#   MTSSL_SLURM_STATE          state directory (default /tmp/mtssl-slurm; /tmp/mtssl-slurmN with --nodes N)
#   MTSSL_SLURM_PORT_BASE      slurmctld port; slurmd, slurmdbd, MariaDB use the next three
#                              (default 6817; 6817 + 100 (N-1) with --nodes N)
#   MTSSL_SLURM_CPUS           CPUs of each node (default: nproc, at least 2)
#   MTSSL_SLURM_CLUSTER        cluster name (default mtssl; mtsslNnode with --nodes N)
#   MTSSL_SLURM_LINK_CONF      1 (default with one node): link /etc/slurm/slurm.conf to the generated config
#                              so sbatch/squeue/sacct work without SLURM_CONF; 0 (default with --nodes): never touch /etc
#   MTSSL_SLURM_NET            with --nodes: the first three numbers of the links' addresses (default 10.213.0)
#   MTSSL_SLURM_SLURMD_TIMEOUT with --nodes: seconds before an unresponsive node is set DOWN (default 30)
#   MTSSL_SLURM_START_TIMEOUT  seconds to wait for each daemon (default 60)
set -euo pipefail

die() { echo "start_local_cluster: error: $*" >&2; exit 1; }
log() { echo "start_local_cluster: $*"; }

NODES=1
while (( $# )); do
    case $1 in
        --nodes) (( $# >= 2 )) || die "--nodes needs a number of nodes, e.g. --nodes 2."; NODES=$2; shift 2 ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) die "unknown argument '$1'; the only option is --nodes N." ;;
    esac
done
[[ $NODES =~ ^[1-9]$ ]] || die "--nodes '$NODES' is not a number of nodes from 1 to 9."

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATE_DIR="$SCRIPT_DIR/local_cluster"
if (( NODES == 1 )); then
    STATE_DIR=${MTSSL_SLURM_STATE:-/tmp/mtssl-slurm}
    PORT_BASE=${MTSSL_SLURM_PORT_BASE:-6817}
    CLUSTER_NAME=${MTSSL_SLURM_CLUSTER:-mtssl}
    LINK_CONF=${MTSSL_SLURM_LINK_CONF:-1}
else  # a second cluster beside the one-node one: its own state, ports and name, and /etc left alone
    STATE_DIR=${MTSSL_SLURM_STATE:-/tmp/mtssl-slurm$NODES}
    PORT_BASE=${MTSSL_SLURM_PORT_BASE:-$((6817 + 100 * (NODES - 1)))}
    CLUSTER_NAME=${MTSSL_SLURM_CLUSTER:-mtssl${NODES}node}
    LINK_CONF=${MTSSL_SLURM_LINK_CONF:-0}
fi
START_TIMEOUT=${MTSSL_SLURM_START_TIMEOUT:-60}
SYSTEM_CONF=/etc/slurm/slurm.conf
STATE_MARKER=.mtssl-slurm-state
PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client slurm-wlm)
(( NODES == 1 )) || PACKAGES+=(iproute2)
NET=${MTSSL_SLURM_NET:-10.213.0}
SLURMD_TIMEOUT_S=${MTSSL_SLURM_SLURMD_TIMEOUT:-30}

[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons); rerun with sudo."
[[ $PORT_BASE =~ ^[0-9]+$ ]] || die "MTSSL_SLURM_PORT_BASE='$PORT_BASE' is not a port number; set e.g. 6817."
[[ $START_TIMEOUT =~ ^[0-9]+$ ]] \
    || die "MTSSL_SLURM_START_TIMEOUT='$START_TIMEOUT' is not a number of seconds."
if (( NODES > 1 )); then
    [[ $NET =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] && (( BASH_REMATCH[1] < 256 && BASH_REMATCH[2] < 256 \
        && BASH_REMATCH[3] < 256 )) || die "MTSSL_SLURM_NET='$NET' is not the first three numbers of an IPv4 address; set e.g. 10.213.0."
    [[ $SLURMD_TIMEOUT_S =~ ^[1-9][0-9]*$ ]] \
        || die "MTSSL_SLURM_SLURMD_TIMEOUT='$SLURMD_TIMEOUT_S' is not a positive number of seconds."
fi
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

# The nodes: names, addresses, and the slurmd files (SLURM expands %n to the node name).
if (( NODES == 1 )); then
    NODE_LIST=("$HOST")
    NODE_ADDR_LIST=(127.0.0.1)
    CONTROLLER_ADDR=127.0.0.1
    SLURMD_SPOOL_DIR="$STATE_DIR/slurmd"
    SLURMD_PID_FILE="$STATE_DIR/run/slurmd.pid"
    SLURMD_LOG_FILE="$STATE_DIR/log/slurmd.log"
    SLURMD_TIMEOUT_S=300  # SLURM's default
else
    NODE_LIST=() NODE_ADDR_LIST=()
    for ((i = 1; i <= NODES; i++)); do NODE_LIST+=("node$i"); NODE_ADDR_LIST+=("$NET.$((10 + i))"); done
    CONTROLLER_ADDR=$NET.1
    SLURMD_SPOOL_DIR="$STATE_DIR/nodes/%n/spool"
    SLURMD_PID_FILE="$STATE_DIR/nodes/%n/slurmd.pid"
    SLURMD_LOG_FILE="$STATE_DIR/nodes/%n/slurmd.log"
fi
NODE_NAMES=$(IFS=,; echo "${NODE_LIST[*]}")
NODE_ADDRS=$(IFS=,; echo "${NODE_ADDR_LIST[*]}")
NETNS_PREFIX="mtssl$PORT_BASE-"  # network namespace of node I: mtssl<port base>-nodeI
LINK_PREFIX="ms${PORT_BASE}n"    # this machine's end of the link to node I: ms<port base>nI
NETWORK_FILE="$STATE_DIR/network"  # what setup_network made, one "netns NAME" or "link NAME" a line
node_file() { echo "${1//%n/$2}"; }  # node_file PATTERN NODE: a slurmd file of that node

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
        -e "s|{{CONTROLLER_ADDR}}|$CONTROLLER_ADDR|g" \
        -e "s|{{NODE_NAMES}}|$NODE_NAMES|g" \
        -e "s|{{NODE_ADDRS}}|$NODE_ADDRS|g" \
        -e "s|{{SLURMD_SPOOL_DIR}}|$SLURMD_SPOOL_DIR|g" \
        -e "s|{{SLURMD_PID_FILE}}|$SLURMD_PID_FILE|g" \
        -e "s|{{SLURMD_LOG_FILE}}|$SLURMD_LOG_FILE|g" \
        -e "s|{{SLURMD_TIMEOUT_S}}|$SLURMD_TIMEOUT_S|g" \
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
    local recorded
    recorded=$(cat "$STATE_DIR/nodes.count" 2>/dev/null || echo 1)  # state dirs of older versions: one node
    if [[ -e $STATE_DIR/$STATE_MARKER && $recorded != "$NODES" ]]; then
        die "$STATE_DIR holds a $recorded-node cluster, not a $NODES-node one; unset MTSSL_SLURM_STATE (each" \
            "size has its own default) or set it to a new path."
    fi
    mkdir -p "$STATE_DIR" "$ETC" "$STATE_DIR/run" "$STATE_DIR/log" "$STATE_DIR/slurmctld" \
        "$MUNGE_DIR" "$MYSQL_DIR"
    local node
    for node in "${NODE_LIST[@]}"; do mkdir -p "$(node_file "$SLURMD_SPOOL_DIR" "$node")"; done
    touch "$STATE_DIR/$STATE_MARKER"
    echo "$NODES" >"$STATE_DIR/nodes.count"
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

node_state() { timeout 10 sinfo --noheader --Node --nodes="$1" --format=%T 2>/dev/null | head -1; }

node_ready() {
    local state
    state=$(node_state "$1")
    case $state in
        idle|mixed|allocated|completing) return 0 ;;
        down*|drain*) timeout 10 scontrol update NodeName="$1" State=RESUME >/dev/null 2>&1 ;;
    esac
    return 1
}

controller_registered() {
    [[ -n $(sacctmgr_q show cluster "$CLUSTER_NAME" format=ControlHost) ]] \
        && timeout 20 sacct --noheader --allusers --starttime=now-1hours >/dev/null
}

# ---------------------------------------------------------------------------------------------------------------
# Nodes in network namespaces (--nodes N)

namespaces_possible() {
    local out
    if ! out=$(unshare --net --uts --mount true 2>&1); then
        echo "start_local_cluster: network namespaces cannot be made here (unshare --net --uts --mount: ${out:-failed});" \
            "a multi-node local cluster needs them." >&2
        exit 3
    fi
}

netns_of() { echo "${NETNS_PREFIX}$1"; }
node_addr() { echo "$NET.$((10 + ${1#node}))"; }

# record KIND NAME: note in NETWORK_FILE that this script made it, so stop_local_cluster.sh removes it.
record() { grep -qxF "$1 $2" "$NETWORK_FILE" 2>/dev/null || echo "$1 $2" >>"$NETWORK_FILE"; }

# An address or a route of the cluster's range that this script did not make means another setup uses it.
check_network_free() {
    local owner
    owner=$(ip -4 -o addr show | awk -v net="$NET." -v ours="^$LINK_PREFIX[0-9]+\$" \
        'index($4, net) == 1 && $2 !~ ours {print $2 " (" $4 ")"; exit}')
    [[ -n $owner ]] || owner=$(ip -4 route show match "$NET.1" | awk -v ours="^$LINK_PREFIX[0-9]+\$" \
        -v own="$NET.0/24" '$1 != "default" && !($1 == "unreachable" && $2 == own) && !($2 == "dev" && $3 ~ ours) \
        {print "route " $0; exit}')
    [[ -z $owner ]] || die "the address range $NET.0/24 is in use on this machine ($owner); set MTSSL_SLURM_NET" \
        "to other free numbers, e.g. MTSSL_SLURM_NET=10.214.0."
}

# Point-to-point veth links, no bridge and no forwarding: this machine (the controller) to each node, and
# each pair of nodes. A node has one address on all of its links, the route to each peer goes over its own
# link: node I reaches the controller through "mgmt" and node J through "to-nodeJ".
setup_network() {
    check_network_free
    # First of all: no packet to an address of the range ever leaves through this machine's default route
    # (to a node whose link is missing, or once the links are gone); the links' own routes are more specific.
    if [[ -z $(ip -4 route show type unreachable "$NET.0/24") ]]; then
        record route "unreachable $NET.0/24"
        ip route add unreachable "$NET.0/24" || die "ip route add unreachable $NET.0/24 failed."
    fi
    local node other ns link
    for node in "${NODE_LIST[@]}"; do
        ns=$(netns_of "$node") link=$LINK_PREFIX${node#node}
        if [[ ! -e /run/netns/$ns ]]; then
            record netns "$ns"
            ip netns add "$ns" || die "ip netns add $ns failed."
        fi
        ip -n "$ns" link set lo up
        if ! ip link show dev "$link" >/dev/null 2>&1; then
            record link "$link"
            ip link add "$link" type veth peer name mgmt netns "$ns" || die "ip link add $link (veth) failed."
        fi
        ip addr replace "$CONTROLLER_ADDR/32" peer "$(node_addr "$node")/32" dev "$link"
        ip link set "$link" up
        ip -n "$ns" addr replace "$(node_addr "$node")/32" peer "$CONTROLLER_ADDR/32" dev mgmt
        ip -n "$ns" link set mgmt up
    done
    for node in "${NODE_LIST[@]}"; do
        for other in "${NODE_LIST[@]}"; do
            [[ ${node#node} -lt ${other#node} ]] || continue
            ns=$(netns_of "$node")
            if ! ip -n "$ns" link show dev "to-$other" >/dev/null 2>&1; then
                ip -n "$ns" link add "to-$other" type veth peer name "to-$node" netns "$(netns_of "$other")" \
                    || die "ip link add to-$other (veth from $node to $other) failed."
            fi
            ip -n "$ns" addr replace "$(node_addr "$node")/32" peer "$(node_addr "$other")/32" dev "to-$other"
            ip -n "$(netns_of "$other")" addr replace "$(node_addr "$other")/32" peer "$(node_addr "$node")/32" \
                dev "to-$node"
            ip -n "$ns" link set "to-$other" up
            ip -n "$(netns_of "$other")" link set "to-$node" up
        done
    done
}

write_hosts_file() {
    local node=$1 other
    {
        echo "# /etc/hosts of $node of the local cluster '$CLUSTER_NAME' (bound over /etc/hosts in its mount namespace)."
        echo "127.0.0.1 localhost"
        echo "# As in Debian's default /etc/hosts: the node's own name is a loopback address here."
        echo "127.0.1.1 $node"
        echo "$CONTROLLER_ADDR $HOST"
        for other in "${NODE_LIST[@]}"; do
            [[ $other == "$node" ]] || echo "$(node_addr "$other") $other"
        done
    } >"$STATE_DIR/nodes/$node/hosts.tmp"
    mv "$STATE_DIR/nodes/$node/hosts.tmp" "$STATE_DIR/nodes/$node/hosts"
}

# True when the pid in file $1 is a live slurmd in the network namespace of node $2.
slurmd_running() {
    running "$1" slurmd || return 1
    (( NODES == 1 )) && return 0
    [[ $(stat -L -c %i "/proc/$(tr -dc 0-9 <"$1")/ns/net") == $(stat -L -c %i "/run/netns/$(netns_of "$2")") ]]
}

start_slurmd() {
    local node=$1 pid_file
    pid_file=$(node_file "$SLURMD_PID_FILE" "$node")
    slurmd_running "$pid_file" "$node" && return 0
    if (( NODES == 1 )); then
        spawn "$STATE_DIR/log/console.log" slurmd -N "$node" \
            || die "slurmd failed to start; see $STATE_DIR/log/slurmd.log and console.log."
        return 0
    fi
    write_hosts_file "$node"
    # In the node's network namespace, a new UTS namespace (its host name) and mount namespace (its hosts
    # file); slurmd and every job step it starts inherit all three. nsenter, not `ip netns exec`: that
    # remounts /sys, without the cgroup file system slurmd needs.
    spawn "$STATE_DIR/nodes/$node/console.log" nsenter --net="/run/netns/$(netns_of "$node")" -- \
        unshare --uts --mount --propagation private -- \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -N "$2"' sh \
        "$STATE_DIR/nodes/$node/hosts" "$node" \
        || die "slurmd of $node failed to start; see $STATE_DIR/nodes/$node/slurmd.log and console.log."
}

start_slurm() {
    running "$STATE_DIR/run/slurmctld.pid" slurmctld || spawn "$STATE_DIR/log/console.log" slurmctld \
        || die "slurmctld failed to start; see $STATE_DIR/log/slurmctld.log and console.log."
    wait_for "$START_TIMEOUT" slurmctld timeout 10 scontrol ping \
        || die "slurmctld does not answer; see $STATE_DIR/log/slurmctld.log."
    local node
    for node in "${NODE_LIST[@]}"; do start_slurmd "$node"; done
    for node in "${NODE_LIST[@]}"; do
        wait_for "$START_TIMEOUT" "node $node" node_ready "$node" \
            || die "node $node is '$(node_state "$node")', not idle; see $(node_file "$SLURMD_LOG_FILE" "$node") and" \
                "$STATE_DIR/log/slurmctld.log."
    done
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
    # The settings it was started with: `env $(cat start.env) slurm/start_local_cluster.sh --nodes N` restarts
    # what is missing of this very cluster (e.g. a node's slurmd) without repeating them.
    cat >"$STATE_DIR/start.env" <<EOF
MTSSL_SLURM_STATE=$STATE_DIR
MTSSL_SLURM_PORT_BASE=$PORT_BASE
MTSSL_SLURM_CLUSTER=$CLUSTER_NAME
MTSSL_SLURM_LINK_CONF=$LINK_CONF
MTSSL_SLURM_CPUS=$CPUS
EOF
    if (( NODES > 1 )); then
        printf 'MTSSL_SLURM_NET=%s\nMTSSL_SLURM_SLURMD_TIMEOUT=%s\n' "$NET" "$SLURMD_TIMEOUT_S" >>"$STATE_DIR/start.env"
    fi
}

install_packages
(( NODES == 1 )) || namespaces_possible
prepare_state_dir
exec 9>"$STATE_DIR/start.lock"
flock -w 600 9 || die "another start_local_cluster.sh holds $STATE_DIR/start.lock for 10 minutes."
# (a concurrent second call waits here, then finds everything running)
write_configs
link_system_conf
(( NODES == 1 )) || setup_network  # before any daemon or command uses the addresses
start_munge
start_mariadb
start_slurmdbd
start_slurm
write_env_file
log "cluster '$CLUSTER_NAME' ready in $(elapsed) s: node(s) $NODE_NAMES, $CPUS CPUs each, partitions low (default) and high"
echo "export SLURM_CONF=$ETC/slurm.conf"
echo "export MTSSL_SLURM_STATE=$STATE_DIR"
