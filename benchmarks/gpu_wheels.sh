#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels dsft needs on the lent GPU machine beyond its image, for
# benchmarks/gpu_session.sh (`dsft bench --suite h100`, benchmarks/serve_throughput.py, the gpu-marked tests).
# The image (the device notes' KINDS.md) has torch, triton, accelerate, tokenizers, safetensors, huggingface-hub,
# numpy, pandas, pyarrow, regex, typer, rich, httpx, prometheus-client, sacrebleu, scikit-learn, pytest, but an
# older transformers and peft, and no trl, liger-kernel, datasets, pydantic, fastapi, uvicorn, datasketch, seqeval or
# rouge-score. The pins are the versions CI tests; transformers 5.25 needs huggingface-hub 2.x (and so httpx2, newer
# click, hf-xet, idna, h11, anyio), whose versions on the image are older or unknown: they travel too. Run from the repo root; writes .whl/ (git-ignored via
# .git/info/exclude), about 25 MB; `DSFT_REHEARSAL=1 bash benchmarks/gpu_session.sh` tries them on this machine.
set -euo pipefail
dest=${1:-.whl}  # PYTHON_VERSION (default 3.12, the image's) picks the wheels of compiled packages
mkdir -p "$dest"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp "${platforms[@]}" \
  -d "$dest" transformers==5.25.0 peft==0.21.2 trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 nltk==3.10.4 defusedxml==0.7.1 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 \
  opentelemetry-api==1.45.2 datasketch==2.0.0 huggingface-hub==2.4.0 httpx2==2.16.2 kernels==0.19.1 tomlkit==0.15.3 \
  httpcore2==2.16.2 truststore==0.10.5 click==8.5.1 hf-xet==1.8.0 idna==3.20 h11==0.16.0 anyio==4.16.0 fsspec==2026.9.0 \
  bitsandbytes==0.50.2
# rouge-score and seqeval ship only as source archives: build their (pure Python) wheels here.
python3 -m pip wheel -q --no-deps -w "$dest" rouge-score==0.1.2 seqeval==1.2.2
ls -l "$dest"
