#!/usr/bin/env bash
# Set up and run the test suite (all tiers; 2-process DeepSpeed runs included). Extra arguments go to pytest,
# e.g.: bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
source scripts/env.sh
python -m pytest "$@"
