#!/usr/bin/env bash
# Fills bench/wheels/ (git-ignored by its own .gitignore) with the wheels that bench/gpu_suite.sh installs on a bare
# GPU machine: Python 3.12 on x86_64 with torch, timm, transformers and mpi4py installed, no registry reachable.
# Run it where pip reaches a registry, from this repository's environment: versions are the pins of
# requirements/cpu-constraints.txt, else the versions installed here. deepspeed has no wheel on PyPI: its sdist is
# built here without ops (DS_BUILD_OPS=0; condmoe uses torch's AdamW, and DeepSpeed builds ops on first use).
# torch is never fetched. Extra arguments name more packages (each NAME or NAME==VERSION).
#   bash bench/prepare_gpu_wheels.sh              # the default set, about 42 MB (av is 36 MB of it)
#   PYTHON_VERSION=3.11 bash bench/prepare_gpu_wheels.sh pyarrow
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
out=bench/wheels
# What the GPU image lacks (its package list: /work/.library/device/KINDS.md): condmoe's deepspeed, webdataset, av
# and simplejpeg, and their requirements that it lacks too (typing-extensions for pydantic's >= 4.16).
packages=(deepspeed webdataset av simplejpeg hjson pydantic pydantic-core annotated-types typing-inspection
          typing-extensions braceexpand "$@")

# NAME==VERSION for each: the pin in the constraints file, else the version installed in this environment.
mapfile -t pins < <("$python_bin" - requirements/cpu-constraints.txt "${packages[@]}" <<'PY'
import importlib.metadata
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pins = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        req = Requirement(line)
        pins[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
for arg in sys.argv[2:]:
    req = Requirement(arg)
    name = canonicalize_name(req.name)
    if name == "torch":
        sys.exit("prepare_gpu_wheels: torch is the GPU machine's own; it is never fetched")
    if str(req.specifier):
        print(arg)
        continue
    try:
        print(f"{name}=={pins.get(name) or importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"prepare_gpu_wheels: {name} is neither pinned in {sys.argv[1]} nor installed here: name a version")
PY
)
[ "${#pins[@]}" -eq "${#packages[@]}" ] || exit 1

rm -rf "$out"
mkdir -p "$out"
printf '# made by bench/prepare_gpu_wheels.sh\n*\n' > "$out/.gitignore"
sdists=$(mktemp -d)
trap 'rm -rf "$sdists"' EXIT
wheels=()
for pin in "${pins[@]}"; do
  if [ "${pin%%==*}" = deepspeed ]; then
    "$python_bin" -m pip download -q --no-deps --no-binary :all: -d "$sdists" "$pin"
    DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$python_bin" -m pip wheel -q --no-deps --no-build-isolation -w "$out" \
      "$sdists"/deepspeed-*.tar.gz
  else
    wheels+=("$pin")
  fi
done
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$python_bin" -m pip download -q --no-deps --only-binary=:all: -d "$out" \
  --python-version "${PYTHON_VERSION:-3.12}" --implementation cp "${platforms[@]}" --platform any "${wheels[@]}"
ls -1 "$out"
du -sh "$out"
