#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs condmoe with its pinned dependencies; safe to re-run.
# CPU machines get the CPU wheel of torch 2.13.0 (requirements/cpu-constraints.txt); on a machine with an NVIDIA
# driver the CUDA build of the same pins is used. DeepSpeed's C++ shm op is built once into .cache/.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
source scripts/env.sh

stamp=.venv/.condmoe-installed
want=$(cat setup.cfg requirements/cpu-constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # torch first and pinned: any requirement that admits a newer torch would otherwise pull a multi-GB CUDA build.
  # CPU machines take the +cpu wheel: from CONDMOE_TORCH_INDEX_URL when set, else from a local wheel that pip's
  # configuration finds (find-links), else from PyTorch's CPU index (its +cpu version outranks PyPI's CUDA build).
  torch_source=()
  if [ -n "${CONDMOE_TORCH_INDEX_URL:-}" ]; then
    torch_source=(--extra-index-url "$CONDMOE_TORCH_INDEX_URL")
  elif [ "$DS_ACCELERATOR" = cpu ] && ! python -m pip index versions torch --no-index 2>/dev/null | grep -q '2\.13\.0+cpu'; then
    torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  python -m pip install -q "${torch_source[@]}" -c requirements/cpu-constraints.txt torch==2.13.0 torchvision==0.28.0
  python -m pip install -q -c requirements/cpu-constraints.txt -e '.[test]'
  echo "$want" > "$stamp"
fi

# DeepSpeed compiles its CPU shared-memory comm op on first use (about a minute on 2 cores). Build it once here,
# and clear locks left by a killed build: a stale lock makes the next build wait forever.
if [ "$DS_ACCELERATOR" = cpu ]; then
  find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null || true
  python - <<'PY'
from deepspeed.comm.torch import build_shm_op
build_shm_op()
PY
fi
