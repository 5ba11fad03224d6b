#!/usr/bin/env bash
# Rehearse benchmarks/gpu_session.sh here, on the CPU, the way it will run on the lent GPU machine: in a virtual
# environment holding the device image's own package versions (the device notes' KINDS.md: transformers 5.17,
# huggingface-hub 1.33, accelerate 1.15, peft 0.20, no pydantic, fastapi, trl or datasets), with the wheels
# benchmarks/gpu_wheels.sh fetches installed over them as the session installs them. A wheel missing from that list,
# or one that does not fit the image's packages, fails here in a minute instead of in device time.
#
#   bash benchmarks/rehearse_gpu_session.sh [STEP ...]      (default steps: varlen serve bench_a)
# Environment: VENV (default /tmp/dsft-image-venv; reused when it exists), OUT (default /tmp/dsft-rehearsal).
set -euo pipefail
venv=${VENV:-/tmp/dsft-image-venv}
python_version=$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0  # the CPU build on this machine's disk; the image has 2.11 with CUDA
  "$venv/bin/pip" install -q accelerate==1.15.0 huggingface_hub==1.33.0 safetensors==0.8.0 tokenizers==0.23.2 \
    transformers==5.17.0 "peft<0.21" pandas pyarrow typer rich pyyaml regex fsspec xxhash tqdm requests httpx psutil \
    tensorboard matplotlib scikit-learn scipy sacrebleu prometheus-client h11 anyio click jinja2 pytest uvloop \
    sentencepiece
  # Some of those pull pydantic in; the image has none, so the carried wheels must bring it.
  "$venv/bin/pip" uninstall -y -q pydantic pydantic-core typing-inspection annotated-types
fi
wheels=$(mktemp -d)
trap 'rm -rf "$wheels" /tmp/dsft-rehearsal-site' EXIT
PYTHON_VERSION=$python_version bash benchmarks/gpu_wheels.sh "$wheels" > /dev/null
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(varlen serve bench_a)
DSFT_REHEARSAL=1 OUT=${OUT:-/tmp/dsft-rehearsal} WHEELS=$wheels SITE=/tmp/dsft-rehearsal-site \
  PYTHON=$venv/bin/python OMP_NUM_THREADS=1 bash benchmarks/gpu_session.sh "${steps[@]}"
