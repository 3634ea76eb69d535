# Shared settings of the local Slurm scripts (sourced, not run).
# ETTIN_SLURM_DIR   private state folder (conf, munge key and socket, state, spool, logs, pid files)
# ETTIN_SLURM_NODES emulated nodes, named 127.0.0.1 .. 127.0.0.N (default 2)
# ETTIN_SLURM_PORT  slurmctld's port; the nodes' slurmd listen on the next N ports (default 6817)
# ETTIN_SLURM_CPUS  CPUs per emulated node (default: this machine's core count)
SLURM_DIR=${ETTIN_SLURM_DIR:-/tmp/ettin-slurm}
NODES=${ETTIN_SLURM_NODES:-2}
CTLD_PORT=${ETTIN_SLURM_PORT:-6817}
CPUS=${ETTIN_SLURM_CPUS:-$(nproc)}
CONF=$SLURM_DIR/slurm.conf
MUNGE_SOCKET=$SLURM_DIR/munge/munge.socket
export SLURM_CONF=$CONF
export PATH="$PATH:/usr/sbin:/sbin"

node_names() {  # 127.0.0.1 127.0.0.2 ...
    local i
    for ((i = 1; i <= NODES; i++)); do echo "127.0.0.$i"; done
}

# pid_alive PIDFILE NEEDLE: the pid in PIDFILE runs and its command line mentions NEEDLE (our folder)
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$2"
}
