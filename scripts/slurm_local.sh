#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the SLURM tests and for trying the
# hydra/launcher=slurm_* configs on a workstation (docs/sweeps.md, "Try SLURM locally").
#
#   scripts/slurm_local.sh [--install] up      start munged, slurmctld, slurmd (idempotent)
#   scripts/slurm_local.sh down                stop them (only the ones this script started)
#   scripts/slurm_local.sh status              daemons, node and queue
#   scripts/slurm_local.sh env                 print the `export SLURM_CONF=...` line
#   eval "$(scripts/slurm_local.sh env)"; sbatch / srun / python -m nlp_transfer.train -m ...
#
# Everything lives in ${SLURM_LOCAL_DIR:-$HOME/.cache/nlp_transfer/slurm}: slurm.conf,
# its own munge key and socket, state, spool, logs and pid files. Nothing is written to
# /etc/slurm or /etc/munge and no system daemon is touched; the client commands find the
# cluster through SLURM_CONF (submitit's sbatch/squeue/scancel calls inherit it). Ports
# 17817/17818 (SLURM_LOCAL_PORT_CTLD / SLURM_LOCAL_PORT_D) keep clear of a real cluster.
# Needs Debian/Ubuntu's slurmctld slurmd slurm-client munge (22.05 tested); --install runs
# apt-get for them. The daemons run as the calling user (root in CI containers).
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-$HOME/.cache/nlp_transfer/slurm}"
CONF="$DIR/slurm.conf"
MARK="# written by nlp_transfer scripts/slurm_local.sh"
PORT_CTLD="${SLURM_LOCAL_PORT_CTLD:-17817}"
PORT_D="${SLURM_LOCAL_PORT_D:-17818}"
PACKAGES=(slurmctld slurmd slurm-client munge)
# command -> Debian package
declare -A PKG_OF=(
    [munged]=munge [mungekey]=munge [slurmctld]=slurmctld [slurmd]=slurmd
    [sbatch]=slurm-client [srun]=slurm-client [squeue]=slurm-client
    [scontrol]=slurm-client [sinfo]=slurm-client [scancel]=slurm-client
)

die() { echo "slurm_local.sh: $*" >&2; exit 1; }
say() { echo "slurm_local.sh: $*"; }

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

find_cmd() {  # the daemons live in /usr/sbin, which a non-root PATH may lack
    command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || true
}

missing_packages() {
    local cmd missing=()
    for cmd in "${!PKG_OF[@]}"; do
        [ -n "$(find_cmd "$cmd")" ] || missing+=("${PKG_OF[$cmd]}")
    done
    [ ${#missing[@]} -eq 0 ] || printf '%s\n' "${missing[@]}" | sort -u | paste -sd ' '
}

install_packages() {
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    say "installing ${PACKAGES[*]} with apt-get"
    "${sudo[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${PACKAGES[@]}"
}

require_packages() {
    local missing
    missing="$(missing_packages)"
    [ -z "$missing" ] && return 0
    if [ "$INSTALL" = 1 ]; then
        install_packages
        missing="$(missing_packages)"
        [ -z "$missing" ] || die "still missing after apt-get: $missing"
        return 0
    fi
    die "missing package(s): $missing
  install them with:  sudo apt-get update && sudo apt-get install -y ${PACKAGES[*]}
  (or run: $0 --install up)"
}

pid_alive() {  # pid_alive <pidfile>: the pid in it runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

check_own_dir() {  # refuse a folder whose slurm.conf another tool wrote
    if [ -e "$CONF" ] && ! head -n1 "$CONF" | grep -qxF "$MARK"; then
        die "$CONF exists and was not written by this script; nothing was changed.
  Choose another folder: SLURM_LOCAL_DIR=<dir> $0 up"
    fi
}

write_conf() {
    local host cpus mem user tmp
    host="$(hostname -s)"
    cpus="$(nproc)"
    # RealMemory in MB, a little under the total so that slurmd's own check passes
    mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 95 / 100 ))
    user="$(id -un)"
    tmp="$CONF.tmp.$$"
    cat >"$tmp" <<EOF
$MARK
# (a private single-node cluster; SLURM_CONF=$CONF)
ClusterName=nlp_transfer_local
# 127.0.0.1: the node needs no resolvable host name (containers, CI)
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT_CTLD
SlurmdPort=$PORT_D
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups and no systemd: processes are tracked through /proc, tasks are not bound
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# look at pending jobs every 2 s (default 60 s), e.g. a requeued job once its BeginTime passed
SchedulerParameters=sched_interval=2,bf_interval=5
ReturnToService=2
# a requeued or cancelled job is killed 5 s after its SIGTERM (default 30 s)
KillWait=5
MinJobAge=300
JobRequeue=1
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1  # unchanged
    fi
    mv "$tmp" "$CONF"
    return 0
}

start_munge() {
    local m="$DIR/munge"
    if pid_alive "$m/munged.pid"; then return 0; fi
    mkdir -p "$m"
    chmod 0700 "$m"
    if [ ! -s "$m/munge.key" ]; then
        "$(find_cmd mungekey)" --create --keyfile="$m/munge.key" 2>/dev/null ||
            dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
        chmod 0400 "$m/munge.key"
    fi
    "$(find_cmd munged)" --force --socket="$m/munge.socket" --key-file="$m/munge.key" \
        --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" ||
        die "munged did not start; see $m/munged.log"
}

daemons_running() {
    pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid"
}

stop_pidfile() {  # stop_pidfile <name> <pidfile>: TERM, then KILL after 10 s
    local name="$1" file="$2" pid i
    pid_alive "$file" || { rm -f "$file"; return 0; }
    pid="$(cat "$file")"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    rm -f "$file"
    say "stopped $name (pid $pid)"
}

wait_ready() {
    local i state
    for i in $(seq 60); do
        if scontrol ping >/dev/null 2>&1; then
            state="$(sinfo -h -N -o '%T' 2>/dev/null | head -n1)"
            case "$state" in
                idle* | mixed* | allocated*) return 0 ;;
            esac
        fi
        sleep 0.5
    done
    die "the cluster did not come up within 30 s (node state: ${state:-?}); see $DIR/log/"
}

cmd_up() {
    check_own_dir
    require_packages
    mkdir -p "$DIR"/{state,spool,log,run}
    export SLURM_CONF="$CONF"
    local changed=0
    write_conf && changed=1
    start_munge
    if daemons_running && [ "$changed" = 0 ]; then
        wait_ready
        say "already up"
    else
        stop_pidfile slurmd "$DIR/run/slurmd.pid"
        stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
        "$(find_cmd slurmctld)" -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
        "$(find_cmd slurmd)" -f "$CONF" || die "slurmd did not start; see $DIR/log/slurmd.log"
        wait_ready
        say "up: node $(hostname -s), $(nproc) CPUs, partition debug"
    fi
    echo "export SLURM_CONF=$CONF"
}

cmd_down() {
    check_own_dir
    stop_pidfile slurmd "$DIR/run/slurmd.pid"
    stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
    stop_pidfile munged "$DIR/munge/munged.pid"
    say "down"
}

cmd_status() {
    local name file
    for name in munged slurmctld slurmd; do
        file="$DIR/run/$name.pid"
        [ "$name" = munged ] && file="$DIR/munge/munged.pid"
        if pid_alive "$file"; then echo "$name: running (pid $(cat "$file"))"; else echo "$name: stopped"; fi
    done
    if [ -f "$CONF" ] && daemons_running; then
        export SLURM_CONF="$CONF"
        sinfo -N -o '%N %P %T %c %m' || true
        squeue || true
    fi
    echo "export SLURM_CONF=$CONF"
}

INSTALL=0
ACTION=""
for arg in "$@"; do
    case "$arg" in
        --install) INSTALL=1 ;;
        -h | --help) usage 0 ;;
        up | down | status | env) ACTION="$arg" ;;
        *) echo "slurm_local.sh: unknown argument '$arg'" >&2; usage 2 ;;
    esac
done
case "$ACTION" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) usage 2 ;;
esac
