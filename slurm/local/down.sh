#!/usr/bin/env bash
# Stop the local cluster of ETTIN_SLURM_DIR: cancel its jobs, shut its daemons down, then end the
# pids in its own pid files (only processes whose command line names this folder). Idempotent.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

[ -d "$SLURM_DIR/run" ] || { echo "no local Slurm in $SLURM_DIR" >&2; exit 0; }

if pid_alive "$SLURM_DIR/run/slurmctld.pid" "$SLURM_DIR"; then
    scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 1 100); do  # jobs leave within KillWait
        [ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
        sleep 0.2
    done
    timeout 20 scontrol shutdown >/dev/null 2>&1 || true
fi

# whatever is left of ours: slurmd per node, slurmctld, munged (TERM, then KILL after 10 s)
pidfiles=("$SLURM_DIR"/run/slurmd-*.pid "$SLURM_DIR/run/slurmctld.pid" "$SLURM_DIR/run/munged.pid")
for f in "${pidfiles[@]}"; do
    [ -e "$f" ] || continue
    if pid_alive "$f" "$SLURM_DIR"; then
        pid=$(cat "$f")
        [ "$(basename "$f")" = munged.pid ] && kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$f"
done
echo "Slurm stopped ($SLURM_DIR)" >&2
