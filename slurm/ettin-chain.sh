#!/usr/bin/env bash
# Submit the phases of one size and objective with slurm/ettin-train.sbatch (no submitit), each
# phase waiting for the one before it (afterok), and print their job ids.
#
#   slurm/ettin-chain.sh SIZE OBJECTIVE RUN_ROOT [sbatch options ...] [-- ettin overrides ...]
#   slurm/ettin-chain.sh 150m mlm runs/ettin --nodes=2 --partition=gpu -- data.root=/data/ettin
#
# ETTIN_PHASES (default "pretrain extension decay") picks the phases; ETTIN_EXPERIMENT the
# experiment (default ettin); ETTIN_AFTER a job id the first phase waits for. Run folders are
# RUN_ROOT/SIZE-OBJECTIVE-PHASE, as ettin launch submit makes them.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
size=$1 objective=$2 root=$(realpath -m "$3")
shift 3
sbatch_opts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do sbatch_opts+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
overrides=("$@")

previous="" after=${ETTIN_AFTER:-}
for phase in ${ETTIN_PHASES:-pretrain extension decay}; do
    key=$size-$objective-$phase
    dependency=singleton
    [ -n "$after" ] && dependency="afterok:$after,singleton"
    init=()
    [ -n "$previous" ] && init=("phase.init_checkpoint=$root/$previous")
    mkdir -p "$root/$key"
    after=$(sbatch --parsable --job-name="ettin-$key" --dependency="$dependency" --output="$root/$key/%x-%j.out" \
        "${sbatch_opts[@]}" "$HERE/ettin-train.sbatch" "${ETTIN_EXPERIMENT:-ettin}" model="$size" objective="$objective" \
        phase="$phase" run_dir="$root/$key" "${init[@]}" "${overrides[@]}")
    after=${after%%;*}
    echo "$key $after $root/$key"
    previous=$key
done
