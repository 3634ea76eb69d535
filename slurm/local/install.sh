#!/usr/bin/env bash
# Install the Slurm daemons, clients and munge from Debian (slurmctld slurmd slurm-client munge).
# Idempotent: does nothing when they are already installed. Needs root (apt-get).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
missing=()
for tool in slurmctld slurmd sbatch munged; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: Slurm is not installed (missing: ${missing[*]}) and installing it needs root: run sudo $0" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing ${PACKAGES[*]} (missing: ${missing[*]})" >&2
if ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
fi
