#!/usr/bin/env bash
# Start a real Slurm cluster on this machine: munged, slurmctld, and one slurmd per emulated node
# (NodeName=127.0.0.[1-N], all on localhost, each on its own port). Idempotent: a running cluster
# of the same folder is left alone. It prints two lines for the shell: `export SLURM_CONF=...`,
# which every client (sbatch, srun, squeue, submitit) needs, and a PATH with bin/sacct, a stand-in
# that answers from the jobcomp log and squeue (there is no slurmdbd):   eval "$(slurm/local/up.sh)"
# Settings: see common.sh (ETTIN_SLURM_DIR, ETTIN_SLURM_NODES, ETTIN_SLURM_PORT, ETTIN_SLURM_CPUS).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

"$HERE/install.sh"

if pid_alive "$SLURM_DIR/run/slurmctld.pid" "$SLURM_DIR" && scontrol ping 2>/dev/null | grep -q UP; then
    echo "Slurm already running from $SLURM_DIR" >&2
else
    "$HERE/down.sh" >/dev/null 2>&1 || true  # leftovers of a half-started cluster of this folder
    mkdir -p "$SLURM_DIR"/{munge,state,spool,log,run,bin}
    chmod 700 "$SLURM_DIR/munge"

    # munge: a private key and socket, so nothing of the system's munge is touched
    if [ ! -s "$SLURM_DIR/munge/munge.key" ]; then
        head -c 1024 /dev/urandom >"$SLURM_DIR/munge/munge.key"
    fi
    chmod 400 "$SLURM_DIR/munge/munge.key"
    if ! pid_alive "$SLURM_DIR/run/munged.pid" "$SLURM_DIR"; then
        munged --force --key-file="$SLURM_DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
            --pid-file="$SLURM_DIR/run/munged.pid" --log-file="$SLURM_DIR/log/munged.log" \
            --seed-file="$SLURM_DIR/munge/munge.seed"
    fi

    last=$((NODES))
    first_slurmd_port=$((CTLD_PORT + 1))
    last_slurmd_port=$((CTLD_PORT + NODES))
    # Job ids start from the clock: a fresh cluster never reuses an earlier cluster's ids (and %j folders).
    first_job_id=$(( ($(date +%s) / 2) % 60000000 + 1000 ))
    cat >"$CONF" <<CONF
# Written by slurm/local/up.sh: a private single-machine cluster of $NODES emulated nodes.
ClusterName=ettin-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$first_slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool/%n
SlurmctldPidFile=$SLURM_DIR/run/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# No slurmdbd: finished jobs go to a text file that \`sacct -c\` reads (and squeue shows them for MinJobAge).
JobCompType=jobcomp/filetxt
JobCompLoc=$SLURM_DIR/log/jobcomp.txt
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
FirstJobId=$first_job_id
MaxJobId=67043328
KillWait=10
InactiveLimit=0
Waittime=0
SchedulerType=sched/backfill
# quick scheduling passes: a requeued or newly eligible job starts within seconds
SchedulerParameters=bf_interval=2,sched_interval=5
NodeName=127.0.0.[1-$last] NodeHostname=localhost Port=[$first_slurmd_port-$last_slurmd_port] CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

    slurmctld -f "$CONF" -c -i
    for node in $(node_names); do
        slurmd -f "$CONF" -N "$node"
    done
fi

# wait until every node is idle (or busy with a job of ours)
for _ in $(seq 1 150); do
    states=$(sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "$states" ] && ! echo "$states" | grep -Eq 'unk|down|drain|fail|not_responding|\*'; then
        echo "Slurm up: $NODES nodes (${states% }) from $SLURM_DIR" >&2
        echo "export SLURM_CONF=$CONF"
        echo "export PATH=$HERE/bin:\$PATH"
        exit 0
    fi
    sleep 0.2
done
echo "error: Slurm nodes did not come up within 30 s (states: ${states:-none}); see $SLURM_DIR/log/" >&2
exit 1
