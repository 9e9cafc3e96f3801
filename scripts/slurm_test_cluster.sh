#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munged + slurmctld + slurmd), for trying
# `lmlab-train -m hydra/launcher=slurm ...` before a real cluster, and for
# tests/test_slurm_cluster.py. Debian/Ubuntu: `apt-get install slurm-wlm munge`; run as root.
#
#   scripts/slurm_test_cluster.sh start    # idempotent; waits until the node is idle
#   eval "$(scripts/slurm_test_cluster.sh env)"   # point sbatch/squeue/scontrol at it
#   scripts/slurm_test_cluster.sh status
#   scripts/slurm_test_cluster.sh stop     # cancels its jobs, stops every daemon it started
#
# Everything lives in $LMLAB_SLURM_DIR (default /tmp/lmlab-slurm): slurm.conf, its own munge
# key and socket, state, spool and logs. Nothing in /etc is touched, so the clients need
# SLURM_CONF=$LMLAB_SLURM_DIR/slurm.conf (what `env` prints). Without slurmdbd there is no
# `sacct`; `scontrol show job` still reports a finished job (with its Restarts= count) for
# MinJobAge seconds.
set -euo pipefail

DIR=${LMLAB_SLURM_DIR:-/tmp/lmlab-slurm}
CTLD_PORT=${LMLAB_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${LMLAB_SLURM_SLURMD_PORT:-6818}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
NODE=$(hostname -s)

die() {
    echo "slurm_test_cluster: $*" >&2
    exit 1
}

alive() { # a pid file whose process is running
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

check_tools() {
    local tool
    for tool in munged mungekey slurmctld slurmd sinfo scontrol; do
        command -v "$tool" >/dev/null || die "$tool not found: apt-get install slurm-wlm munge"
    done
    [[ $(id -u) == 0 ]] || die "run as root (slurmd starts jobs as their users)"
}

write_config() {
    mkdir -p "$DIR"/{munge,state,spool,log}
    chmod 700 "$DIR/munge"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        mungekey --create --keyfile="$DIR/munge/munge.key"
    fi
    # This node as slurmd sees it (CPUs, sockets, cores, RealMemory in MB), reachable on
    # the loopback address whatever the host name resolves to.
    local node_line
    node_line=$(slurmd -C | head -n 1)
    [[ $node_line == NodeName=* ]] || die "slurmd -C did not describe this node: $node_line"
    cat >"$CONF" <<EOF
# written by scripts/slurm_test_cluster.sh; edits are overwritten by the next start
ClusterName=lmlab-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again cred_expire + 1 s after it was requeued (120 s by default)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups (containers usually have none to give): processes are tracked through /proc
# and not confined to their CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
# Jobs share the node, one CPU each unless they ask for more; memory is not a consumable.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# look at the queue every few seconds, not every minute: a requeued job starts soon after
# it is eligible again
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=30
InactiveLimit=60
KillWait=30
MinJobAge=3600
JobRequeue=1
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    check_tools
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && alive "$DIR/munge/munged.pid"; then
        echo "slurm_test_cluster: already running ($CONF)"
        wait_idle
        return
    fi
    stop_daemons # a half-started cluster: start again from nothing
    write_config
    munged --force \
        --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    slurmctld -f "$CONF"
    slurmd -f "$CONF" -N "$NODE"
    wait_idle
    echo "slurm_test_cluster: node $NODE idle; clients need: export SLURM_CONF=$CONF"
}

wait_idle() {
    local state=""
    for _ in $(seq 60); do
        state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
        case $state in
        idle | mix | alloc) return ;;
        down* | drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 1
    done
    die "node $NODE not idle after 60 s (sinfo: '${state}'); see $DIR/log/"
}

stop_daemons() {
    local pidfile pid
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        alive "$pidfile" || continue
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        rm -f "$pidfile"
    done
    return 0
}

stop() {
    if alive "$DIR/slurmctld.pid"; then
        # Cancel the jobs first: slurmd leaves the processes of running jobs alive when it
        # stops, and a test cluster should leave nothing behind.
        scancel --full --quiet --user=root 2>/dev/null || true
        for _ in $(seq 60); do
            [[ -z $(squeue -h -t running,completing,configuring -o %i 2>/dev/null) ]] && break
            sleep 1
        done
    fi
    stop_daemons
    echo "slurm_test_cluster: stopped"
}

status() {
    local pidfile
    for pidfile in "$DIR/munge/munged.pid" "$DIR/slurmctld.pid" "$DIR/slurmd.pid"; do
        if alive "$pidfile"; then
            echo "$(basename "$pidfile" .pid): running (pid $(cat "$pidfile"))"
        else
            echo "$(basename "$pidfile" .pid): not running"
        fi
    done
    if alive "$DIR/slurmctld.pid"; then
        sinfo
        squeue
    fi
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*) die "usage: $0 start|stop|status|env" ;;
esac
