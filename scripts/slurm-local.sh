#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying `normlab reproduce --backend slurm` and
# for its tests: munged, slurmctld and slurmd with their own config, sockets, ports and state
# under one directory, so that nothing in /etc is touched and several clusters can coexist.
#
#   scripts/slurm-local.sh start|stop|status      (as root; Debian: apt-get install -y
#                                                  slurmctld slurmd slurm-client munge)
#   export SLURM_CONF=$NORMLAB_SLURM_DIR/slurm.conf   then sbatch, squeue, normlab ... as usual
#
# NORMLAB_SLURM_DIR (default /tmp/normlab-slurm) holds everything. NORMLAB_SLURM_READONLY=DIR
# makes DIR read-only for the jobs (slurmd runs in its own mount namespace): a directory that
# this machine can write and the "nodes" cannot, for tests. Exit codes: 0 done, 1 failed to
# start (the logs are named), 3 cannot run here (the reason is printed).
set -euo pipefail

DIR=${NORMLAB_SLURM_DIR:-/tmp/normlab-slurm}
CONF=$DIR/slurm.conf
NODE=normlab-node
export SLURM_CONF=$CONF

need() {
    for cmd in munged slurmctld slurmd sbatch squeue sinfo scontrol; do
        command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin
        if ! command -v "$cmd" >/dev/null 2>&1; then
            echo "slurm-local: '$cmd' is not installed; on Debian: apt-get install -y slurmctld slurmd slurm-client munge" >&2
            exit 3
        fi
    done
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-local: slurmd must run as root to start jobs; run this script as root" >&2
        exit 3
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

running() {
    [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null
}

write_conf() {
    local cpus memory
    cpus=$(nproc)
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh: a one-node cluster for normlab's tests.
ClusterName=normlab
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# no cgroups: jobs are plain processes, tracked by their parent ids
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# quick turnarounds for tests: a killed job's processes get 2 s after SIGTERM, and ended jobs
# stay visible to squeue for 10 minutes
MinJobAge=600
KillWait=2
SchedulerParameters=sched_min_interval=100000
NodeName=$NODE NodeHostname=$(hostname) NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start() {
    need
    if running slurmctld && running slurmd && running munged; then
        echo "slurm-local: already running; export SLURM_CONF=$CONF"
        return 0
    fi
    stop >/dev/null 2>&1 || true
    mkdir -p "$DIR/state" "$DIR/spool"
    chmod 700 "$DIR"
    [ -f "$DIR/munge.key" ] || { head -c 1024 /dev/urandom >"$DIR/munge.key"; chmod 400 "$DIR/munge.key"; }
    munged --force --socket="$DIR/munge.socket" --key-file="$DIR/munge.key" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed"
    write_conf
    slurmctld -f "$CONF" -i
    if [ -n "${NORMLAB_SLURM_READONLY:-}" ]; then
        # jobs inherit slurmd's mount namespace, in which this directory is read-only
        unshare -m --propagation private sh -c 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"' \
            "$NORMLAB_SLURM_READONLY" slurmd -f "$CONF" -N "$NODE" || {
            echo "slurm-local: cannot make $NORMLAB_SLURM_READONLY read-only for the jobs (needs root and mount namespaces)" >&2
            stop >/dev/null 2>&1 || true
            exit 3
        }
    else
        slurmd -f "$CONF" -N "$NODE"
    fi
    for _ in $(seq 1 60); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "slurm-local: running (one node, $(nproc) CPUs, partition debug); export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "slurm-local: the node did not come up within 30 s; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
    exit 1
}

stop() {
    local name pid
    if [ -f "$CONF" ]; then
        scancel --quiet --full -u "$(id -un)" 2>/dev/null || true
    fi
    for name in slurmd slurmctld munged; do
        if running "$name"; then
            pid=$(cat "$DIR/$name.pid")
            kill "$pid"
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$name.pid"
    done
    echo "slurm-local: stopped"
}

status() {
    if [ -f "$CONF" ] && running slurmctld && running slurmd && scontrol ping >/dev/null 2>&1; then
        echo "slurm-local: running; export SLURM_CONF=$CONF"
        sinfo
    else
        echo "slurm-local: not running (start it with: $0 start)"
        exit 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (state in \$NORMLAB_SLURM_DIR, default /tmp/normlab-slurm)" >&2; exit 2 ;;
esac
