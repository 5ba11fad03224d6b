#!/usr/bin/env bash
# One device call's worth of GPU measurements for the open issues, most needed first, each step under its own time
# limit inside one total budget, so the call returns inside the device tool's 10-minute limit with every number that
# finished (the bench and serve scripts rewrite their JSON after each recipe or level, so a step cut short keeps its
# finished part). See benchmarks/README.md for what each step measures and what to check.
#
# On the device machine, with `carry: [".whl"]` (from benchmarks/gpu_wheels.sh):
#   bash benchmarks/gpu_session.sh                      # varlen serve bench_a switches, in that order
#   bash benchmarks/gpu_session.sh bench_d bench_a_longest
# Steps: varlen switches serve bench_a bench_a_rows bench_b bench_c bench_d bench_a_longest serve_continuous
# qlora (the gpu-marked QLoRA, 8-bit and LoftQ tests) methods_7b (LoRA against QLoRA on R1-Distill-Qwen-7B shapes,
# 2k tokens: the issue's target) methods_1.5b (the whole method table on R1-Distill-Qwen-1.5B shapes)
# moe_telemetry (the MoE load telemetry's share of a LoRA step on DeepSeek-V2-Lite shapes, 6 layers; target < 3%).
# Environment: OUT (logs and JSON; default benchmarks/results/gpu_session), BUDGET_S (whole script, default 540),
# PYTHON (default python3), WHEELS (default .whl), SITE (where the wheels are installed, default /tmp/site),
# DSFT_REHEARSAL=1: the same steps on a CPU with the tiny suite and a tiny preset, to try this script and the wheels
# before a GPU session (tests/recipes/test_gpu_session.py does).
set -uo pipefail
started_s=$SECONDS
OUT=${OUT:-benchmarks/results/gpu_session}
BUDGET_S=${BUDGET_S:-540}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1

if [[ ${DSFT_REHEARSAL:-0} == 1 ]]; then
  suite=tiny shape=tiny-qwen2 serve_tokens=8 clients=1,4 rows=128  # qwen2: the GPU shape's family; continuous needs it
  large=small-qwen2 small=small-qwen2 method_steps=2 method_tokens=32
  moe=(--shape tiny-deepseek-v3 --tokens 32 --batch 2 --steps 2 --warmup 1)
else
  suite=h100 shape=deepseek-r1-distill-qwen-1.5b serve_tokens=128 clients=1,64 rows=16384
  large=deepseek-r1-distill-qwen-7b small=deepseek-r1-distill-qwen-1.5b method_steps=10 method_tokens=2048
  moe=(--shape deepseek-v2-lite --layers 6 --tokens 2048 --batch 2 --steps 10 --warmup 3)
fi
methods=("$PY" benchmarks/methods.py --base-steps 0 --steps "$method_steps" --max-length "$method_tokens"
         --batch-size 1 --gradient-checkpointing --work /tmp/dsft_methods)
bench=("$PY" -m dsft.cli bench --suite "$suite")
serve=("$PY" benchmarks/serve_throughput.py --shape "$shape" --clients "$clients" --max-tokens "$serve_tokens"
       --baseline-requests 8 --min-requests 8 --requests-per-client 2)

# step name -> "limit in seconds|command"
declare -A steps=(
  [varlen]="150|$PY -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_varlen_attention.py"
  [switches]="240|$PY -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_speed_switches.py"
  [serve]="200|${serve[*]} --output $OUT/serve_throughput.json"
  [serve_continuous]="200|${serve[*]} --engine continuous --output $OUT/serve_throughput_continuous.json"
  [bench_a]="420|${bench[*]} --setup a --profile --output $OUT/bench_a.json"
  [bench_a_rows]="420|${bench[*]} --setup a --row-tokens $rows --output $OUT/bench_a_rows.json"
  [bench_b]="420|${bench[*]} --setup b --output $OUT/bench_b.json"
  [bench_c]="540|${bench[*]} --setup c --output $OUT/bench_c.json"
  [bench_d]="540|${bench[*]} --setup d --output $OUT/bench_d.json"
  [bench_a_longest]="540|${bench[*]} --setup a --longest --output $OUT/bench_a_longest.json"
  [qlora]="300|$PY -m pytest -q -p no:cacheprovider -m gpu tests/recipes/test_qlora.py tests/recipes/test_peft_menu.py"
  [methods_7b]="420|${methods[*]} --shape $large --methods lora,qlora --output $OUT/methods_7b.json"
  [methods_1.5b]="540|${methods[*]} --shape $small --output $OUT/methods_1.5b.json"
  [moe_telemetry]="240|$PY benchmarks/moe_telemetry.py ${moe[*]} --output $OUT/moe_telemetry_v2_lite.json"
)
chosen=("$@")
[[ ${#chosen[@]} -gt 0 ]] || chosen=(varlen serve bench_a switches)
for name in "${chosen[@]}"; do
  [[ -n ${steps[$name]+x} ]] || { echo "session: unknown step $name; steps: ${!steps[*]}"; exit 2; }
done

echo "session: $(date -u +%FT%TZ) steps ${chosen[*]}, budget ${BUDGET_S} s, rehearsal ${DSFT_REHEARSAL:-0}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "session: installing $WHEELS failed"; exit 3; }
  export PYTHONPATH="$SITE:$PWD"
else
  export PYTHONPATH="$PWD"
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
# Every module the steps import, and the versions that ran: a missing wheel fails here in seconds, not mid-bench.
"$PY" - <<'EOF' || { echo "session: dsft does not import with these packages"; exit 4; }
import importlib, importlib.metadata as md
import torch
for module in ("dsft.cli", "dsft.bench.run", "dsft.bench.recipes", "dsft.serve.server", "trl", "peft", "datasets",
               "fastapi", "uvicorn"):
    importlib.import_module(module)
names = ("transformers", "peft", "trl", "liger-kernel", "accelerate", "datasets", "huggingface-hub", "tokenizers",
         "fastapi", "pydantic", "triton")
versions = {}
for name in names:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"session: torch {torch.__version__} (CUDA {torch.version.cuda}), GPU {gpu};", versions)
EOF

declare -a summary=()
for name in "${chosen[@]}"; do
  left_s=$(( BUDGET_S - (SECONDS - started_s) ))
  IFS='|' read -r limit_s command <<< "${steps[$name]}"
  (( limit_s > left_s )) && limit_s=$left_s
  if (( limit_s < 30 )); then
    summary+=("$name skipped (${left_s} s left)"); continue
  fi
  echo "session: step $name, at most ${limit_s} s: $command"
  step_started_s=$SECONDS
  # SIGINT first (Python unwinds: the JSON written so far stays, CUDA is released), SIGKILL 20 s later.
  PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=20 "$limit_s" bash -c "$command"
  rc=$?
  summary+=("$name rc=$rc $(( SECONDS - step_started_s )) s$( (( rc == 124 )) && echo ' (time limit)')")
done
echo "session: done in $(( SECONDS - started_s )) s"
printf 'session:   %s\n' "${summary[@]}"
ls -l "$OUT"
