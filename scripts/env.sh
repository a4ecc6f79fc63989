# Environment shared by the demo, the tests and CI (sourced, not executed).
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$repo_root/.cache/torch_extensions}
# Two ranks on a 2-core machine: one BLAS thread each, or they fight over the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::DeprecationWarning,ignore::FutureWarning}
