#!/usr/bin/env bash
# The GPU suite (bench/gpu_suite.py says what it runs): bash bench/gpu_suite.sh OUT_DIR [--dry-run] [--steps ...]
# On a GPU machine it installs what it lacks from bench/wheels/ (bench/prepare_gpu_wheels.sh); --dry-run runs the
# same steps on CPU at tiny sizes and installs nothing. PYTHON picks the interpreter (default: python3).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dry_run=0
for arg in "$@"; do
  if [ "$arg" = --dry-run ]; then dry_run=1; fi
done
if [ "$dry_run" = 1 ]; then
  export DS_ACCELERATOR=cpu
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}  # env.sh's default of 1 is for two ranks on two cores
fi
# shellcheck disable=SC1091
source "$repo/scripts/env.sh"
exec "${PYTHON:-python3}" "$repo/bench/gpu_suite.py" "$@"
