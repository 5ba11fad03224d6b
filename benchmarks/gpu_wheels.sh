#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels `dsft bench --suite h100` needs on the lent GPU machine beyond its image
# (its image has torch, triton, accelerate, tokenizers, safetensors, huggingface-hub, pandas, pyarrow, typer, rich;
# transformers there is older than dsft needs). Run from the repo root; writes .whl/ (git-ignored via
# .git/info/exclude), about 25 MB. See benchmarks/README.md for the run itself.
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$dest" transformers==5.23.0 peft==0.21.2 trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  nltk==3.10.4
# rouge-score ships only as a source archive: build its (pure Python) wheel here.
python3 -m pip wheel -q --no-deps -w "$dest" rouge-score==0.1.2
ls -l "$dest"
