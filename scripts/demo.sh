#!/usr/bin/env bash
# The demo: set up, prepare the embedded synthetic data, pre-train a Uni-Perceiver-MoE (debug size, 4 experts,
# top-2, every other block) on 2 CPU ranks with expert parallelism (ep_size=2) and ZeRO-2, then evaluate zero-shot.
# Extra arguments are config overrides, e.g.: bash scripts/demo.sh run.max_steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
source scripts/env.sh

config=configs/demo.yaml
condmoe-prep synthetic --out data/synthetic --seed 0
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "$port" -m condmoe.train --config "$config" "$@"
condmoe-eval --config "$config" "$@"
