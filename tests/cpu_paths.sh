#!/usr/bin/env bash
# Run the learning tests (pytest -m learning) once per CPU path: each SIMD capability this CPU has
# (ATEN_CPU_CAPABILITY=default, avx2, avx512) times each thread setting (OMP_NUM_THREADS=1 and torch's default)
# times, where torch uses MKL, MKL's own GEMM code path and its compatible one (MKL_CBWR=COMPATIBLE: MKL picks its
# kernels by CPU, not by ATEN_CPU_CAPABILITY, so this is how one machine sees another CPU's summation order),
# then print one table of every claim: test, path, threads, measured value, relation, bound, and whether it held
# where it had to (or failed where it had to, for the runs that do not learn).
#
#   bash tests/cpu_paths.sh                       # every path and thread setting this machine has
#   PATHS="default" THREADS="1" BLAS="auto" bash tests/cpu_paths.sh tests/recipes/test_dpo.py   # a subset
#
# Writes the records and the table to $OUT_DIR (default: cpu_paths/ in the repository root); exits 1 when a
# test failed on any path.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT_DIR:-cpu_paths}"
mkdir -p "$out_dir"
rm -f "$out_dir"/*.jsonl  # the table shows this run only

native=$(python -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")
case "$native" in
  avx512) available="default avx2 avx512" ;;
  avx2) available="default avx2" ;;
  default) available="default" ;;
  *) available="default $native" ;;  # aarch64 (sve256), ppc64le (vsx), s390x (zvector)
esac
paths="${PATHS:-$available}"
threads="${THREADS:-1 default}"
mkl=$(python -c "import torch; print(int(torch.backends.mkl.is_available()))")
if [ "$mkl" = 1 ]; then blas="${BLAS:-auto compatible}"; else blas="${BLAS:-auto}"; fi
echo "CPU: $(python -c 'import platform; print(platform.processor() or platform.machine())'), torch's own path: $native;" \
     "paths: $paths; threads: $threads; MKL summation: $blas"

selection=("$@")
[ ${#selection[@]} -eq 0 ] && selection=(tests)
status=0
run() {  # run PATH THREADS BLAS: the marked tests under one path, their claims appended to one log
  local log="$out_dir/$1-threads_$2-mkl_$3.jsonl"
  local settings=(ATEN_CPU_CAPABILITY="$1" DSFT_LEARNING_LOG="$log")
  rm -f "$log"
  [ "$2" != default ] && settings+=(OMP_NUM_THREADS="$2")
  [ "$3" != auto ] && settings+=(MKL_CBWR="${3^^}")
  echo "== ${settings[*]}"
  env -u OMP_NUM_THREADS -u MKL_CBWR "${settings[@]}" python -m pytest -q -p no:cacheprovider -m learning "${selection[@]}"
}
for path in $paths; do
  for thread in $threads; do
    for order in $blas; do
      run "$path" "$thread" "$order" || status=1
    done
  done
done

python tests/cpu_paths_table.py "$out_dir"/*.jsonl | tee "$out_dir/table.md"
exit $status
