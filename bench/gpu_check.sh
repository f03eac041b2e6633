#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and no network, prove the CUDA half of qlora_ext.
#
#   bash bench/gpu_check.sh OUTDIR            # the real check (needs nvidia-smi, nvcc, a CUDA torch)
#   bash bench/gpu_check.sh --dry-run OUTDIR  # no GPU: the checks that keep this script from rotting
#
# Real run, in order, each step under its own timeout and all of them under one deadline
# (GPU_CHECK_BUDGET_S, default 530 s, so that it ends within 9 minutes on an H100):
#   1. preflight   the GPU (nvidia-smi), its compute capability -> the CUDA arch to build for
#   2. build       pip install --no-build-isolation --no-deps -C cmake.define.QLORA_CUDA=ON
#                  -C cmake.define.QLORA_CUDA_ARCHS=<arch> .   (QLORA_CUDA_ARCHS=... overrides)
#   3. import      the installed qlora_ext has CUDA kernels and sees the GPU
#   4. tests       pytest python_tests -k cuda: the CUDA cases (the CPU ones ran in CI), with
#                  pytest-xdist's 4 workers where the image has it                  } side
#   5. memcheck    compute-sanitizer --tool memcheck   on bench/sanitize_ops.py  } by
#   6. racecheck   compute-sanitizer --tool racecheck  on bench/sanitize_ops.py  } side
#                  (both on the kernels named *_kernel*, ours, where the sanitizer filters by name)
#      fuzz        bench/fuzz_ops.py --device cuda for 60 s: random shapes, dtypes and layouts
#                  against the reference (also beside the tests)
#   7. cuda-ran    the CUDA test cases really ran: none skipped for want of a GPU
#   8. codec       python -m bench codec  --device cuda --quick
#   9. linear      python -m bench linear --device cuda --quick
#  10. train       python -m bench model_train --device cuda --quick   (the ~130M config: ours eager and
#                  compiled, HF+PEFT+bnb)
#  11. build-7b    python -m bench model_build --device cuda --quick   (memory after init with LoRA on
#                  q/k/v/o + MLP, where every projection is NF4)
#  12. seed-7b     python -m bench model_seed_7b --device cuda --quick   (the seed tutorial's 7B QLoRA
#                  config, random weights: memory after init and in training, it/s eager and compiled;
#                  last, the longest, where the deadline may cut it)
# The image of the GPU machines has neither bitsandbytes nor torchao. When .gpu_deps/site-packages
# exists (bench/stage_gpu_deps.sh makes it; carry it along), it goes on PYTHONPATH, so the parity
# tests and the comparison rows run there too.
# Logs go to OUTDIR/logs/, benchmark JSON to OUTDIR/results/<gpu>/, the summary to
# OUTDIR/summary.txt. Exit status 0 only when every step passed. Speed targets are printed with
# the benchmark tables; a missed target is reported but does not fail the check.
#
# Dry run (no GPU, under 2 minutes; CI runs it through python_tests/test_bench.py): every file the
# real run uses exists; bench/*.sh and bench/*.py parse; the CUDA kernels' names match the
# sanitizers' filter; the build command's CMake options exist and pip accepts the command
# (metadata only); the junit check; the sanitizer workload and 20 fuzz cases on the CPU; a smoke
# run of the codec and linear benchmarks on the CPU; each bench/model_*.py offers the options the
# harness passes it.
#
# Environment: PYTHON (default python3), QLORA_CUDA_ARCHS, GPU_CHECK_BUDGET_S, and
# QLORA_BENCH_GIT_REVISION (the commit, for the JSON, where the copy has no .git).
# The lent GPU machines return at most 8 files from $OUT, and this writes about 20: run it into a
# scratch folder and pack that, e.g.
#   QLORA_BENCH_GIT_REVISION=<sha> bash bench/gpu_check.sh /tmp/gc; rc=$?; tar czf "$OUT/gc.tgz" -C /tmp gc; exit $rc
# Step limits below add up to more than the budget; the deadline cuts the last ones short.
set -uo pipefail

usage() { echo "usage: bash bench/gpu_check.sh [--dry-run] OUTDIR" >&2; exit 2; }
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
[[ $# -eq 1 ]] || usage
mkdir -p "$1/logs" "$1/results" || exit 2
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
START=$(date +%s)
if (( DRY_RUN )); then BUDGET=${GPU_CHECK_BUDGET_S:-110}; else BUDGET=${GPU_CHECK_BUDGET_S:-530}; fi
DEADLINE=$(( START + BUDGET ))
SUMMARY=()
FAILURES=0

banner() { printf '\n===== [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# start_step NAME TIMEOUT_S CMD... : starts CMD in the background with its output in
# OUT/logs/NN-NAME.log, under min(TIMEOUT_S, time left before the deadline). wait_steps waits for
# every started step and records each as PASS or FAIL (showing the end of a failed step's log;
# with SHOW=1 at start, the log less bench progress lines on success too). run_step = both.
STEP_NO=0
RUNNING=()  # "pid|name|log|t0|limit|show" of started steps
start_step() {
  local name=$1 limit=$2; shift 2
  STEP_NO=$(( STEP_NO + 1 ))
  local log; log="$OUT/logs/$(printf %02d "$STEP_NO")-$name.log"
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 10 )); then
    SUMMARY+=("FAIL  $name: not run, the ${BUDGET}s budget is spent"); FAILURES=$(( FAILURES + 1 ))
    banner "[$STEP_NO] $name: FAIL (no time left)"; return 1
  fi
  (( limit > left )) && limit=$left
  local cmd="$*"
  (( ${#cmd} > 150 )) && cmd="${cmd:0:150}..."
  banner "[$STEP_NO] $name (timeout ${limit}s): ${cmd//$'\n'/ }"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 &
  RUNNING+=("$!|$name|$log|$(date +%s)|$limit|${SHOW:-0}")
}

wait_steps() {  # returns non-zero when one of the steps failed
  local entry pid name log t0 limit show rc dt why any=0
  for entry in "${RUNNING[@]}"; do
    IFS='|' read -r pid name log t0 limit show <<<"$entry"
    wait "$pid"; rc=$?; dt=$(( $(date +%s) - t0 ))
    if (( rc == 0 )); then
      SUMMARY+=("PASS  $name (${dt}s)")
      echo "PASS: $name (${dt}s, log $log)"
      if [[ "$show" == 1 ]]; then grep -v '^\[bench ' "$log"; fi
    else
      why="exit status $rc"
      (( rc == 124 || rc == 137 )) && why="timed out after ${limit}s"
      SUMMARY+=("FAIL  $name (${dt}s): $why; log $log"); FAILURES=$(( FAILURES + 1 ))
      echo "!!!!! FAIL: $name: $why. Last lines of $log:"
      tail -n 40 "$log" | sed 's/^/    | /'
      any=1
    fi
  done
  RUNNING=()
  return $any
}

run_step() { start_step "$@" || return 1; wait_steps; }

# "9.0" (nvidia-smi's compute_cap) -> "90" (CMake's CUDA_ARCHITECTURES); several GPUs -> "80;90".
cuda_arch_from() { tr -d ' .' <<<"$1" | grep -v '^$' | sort -u | paste -sd ';' -; }

build_command() {  # the one build command, used by the real run and checked by the dry run
  echo "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v \
    -C cmake.define.QLORA_CUDA=ON -C "cmake.define.QLORA_CUDA_ARCHS=$1" .
}

find_sanitizer() {
  local nvcc_dir=""
  command -v nvcc >/dev/null && nvcc_dir=$(dirname "$(command -v nvcc)")
  for c in "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" "$nvcc_dir/compute-sanitizer"; do
    [[ -n "$c" && -x "$c" ]] && { echo "$c"; return 0; }
  done
  return 1
}

# sanitizer_options HELP_TEXT: the options to give compute-sanitizer, as far as its --help offers
# them. --kernel-name kns=_kernel: instrument only kernels named *_kernel* (all of qlora's and
# torch's element-wise ones, not cuBLAS's): faster, and racecheck judges our shared memory use, not
# cuBLAS's barriers. --report-api-errors no: CUDA API errors that torch and its libraries handle
# themselves (probes, queries) would fail the check; ours raise in Python anyway (C10_CUDA_CHECK).
# The help text is taken whole: `--help | grep -q` under pipefail fails when grep stops reading
# before the help ends (SIGPIPE), which read as "no such option".
sanitizer_options() {
  local opts=()
  [[ $1 == *"--kernel-name "* ]] && opts+=(--kernel-name kns=_kernel)
  [[ $1 == *"--report-api-errors"* ]] && opts+=(--report-api-errors no)
  echo "${opts[*]}"
}

finish() {
  banner "summary ($(( $(date +%s) - START ))s of ${BUDGET}s)"
  printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
  if (( FAILURES )); then
    echo; echo "!!!!! gpu_check: $FAILURES step(s) FAILED (logs in $OUT/logs)" | tee -a "$OUT/summary.txt"
    exit 1
  fi
  echo; echo "gpu_check: all steps passed (logs in $OUT/logs, results in $OUT/results)" | tee -a "$OUT/summary.txt"
  exit 0
}

# Reads pytest's junit XML: the cuda cases of the tests really ran, none skipped for want of a GPU.
JUNIT_CHECK=$(cat <<'PY'
import sys, xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
cuda = [c for c in cases if "cuda" in c.get("name", "")]
# conftest.devices() skips a cuda case with one of these reasons where it cannot run
no_gpu = [c.get("name") for c in cuda if c.find("skipped") is not None
          and any(r in (c.find("skipped").get("message") or "") for r in ("no CUDA GPU", "built without CUDA"))]
print(f"{len(cases)} test cases, {len(cuda)} with 'cuda' in their name, {len(no_gpu)} of those skipped for want of a GPU")
if not cuda or no_gpu:
    sys.exit(f"CUDA cases must run here; skipped: {no_gpu[:20]}")
PY
)

REQUIRED_FILES=(pyproject.toml CMakeLists.txt csrc python_tests bench/__main__.py bench/codec.py
  bench/linear.py bench/model.py bench/model_build.py bench/model_seed_7b.py bench/model_train.py
  bench/sanitize_ops.py bench/fuzz_ops.py)

if (( DRY_RUN )); then
  banner "gpu_check --dry-run in $REPO -> $OUT (python: $PYTHON)"
  run_step files 10 bash -c 'for f in "$@"; do if [[ -e "$f" ]]; then echo "ok $f"; else echo "MISSING $f"; exit 1; fi; done' \
    _ "${REQUIRED_FILES[@]}"
  # These two side by side, as the real run's sanitizers are.
  start_step syntax 60 bash -c 'for f in bench/*.sh; do bash -n "$f" || exit 1; done && "$1" -m py_compile bench/*.py && echo "bash -n and py_compile: ok"' _ "$PYTHON"
  start_step arch-parse 10 bash -c '[[ "$1" == 90 && "$2" == "80;90" ]] && echo "9.0 -> $1; 8.0,9.0,9.0 -> $2"' _ \
    "$(cuda_arch_from "9.0")" "$(cuda_arch_from $'8.0\n9.0\n9.0')"
  wait_steps
  # The CMake options the build passes must exist (a rename would otherwise be silently ignored).
  # The cmake and ninja installed beside $PYTHON come first (pip's, in a venv not activated): a
  # distribution's older cmake elsewhere on the PATH fails CMakeLists.txt's minimum version.
  run_step cmake-configure 60 env PATH="$(dirname "$PYTHON"):$PATH" bash -c 'cmake -S . -B "$1" -G Ninja -DQLORA_CUDA=OFF -DQLORA_CUDA_ARCHS=90 -DPython_EXECUTABLE="$2" >/dev/null \
    && cmake -N -LA "$1" | grep -E "^QLORA_CUDA:STRING=|^QLORA_CUDA_ARCHS:STRING=90$"' _ "$OUT/cmake-configure" "$PYTHON"
  if "$PYTHON" -c "import scikit_build_core" 2>/dev/null; then
    # shellcheck disable=SC2046  # build_command's words are meant to split
    run_step pip-accepts-build 60 $(build_command 90 | sed 's/ -v / --dry-run /')
  else
    SUMMARY+=("SKIP  pip-accepts-build: scikit-build-core is not installed here (the GPU machine has it)")
  fi
  # The sanitizer options come from a long help text (as compute-sanitizer's is), whole.
  run_step sanitizer-options 10 bash -c '[[ "$1" == "--kernel-name kns=_kernel --report-api-errors no" && -z "$2" ]] && echo "options: $1"' _ \
    "$(sanitizer_options "$(echo "  --kernel-name arg"; seq 1 50000 | sed 's/^/  --option-/'; echo "  --report-api-errors arg")")" \
    "$(sanitizer_options "  --tool arg")"
  # The sanitizers instrument kernels by name (kns=_kernel): a kernel named otherwise would go unchecked.
  run_step kernel-names 10 bash -c 'bad=$(grep -n "__global__" csrc/cuda/*.cu csrc/cuda/*.cuh | grep -v "_kernel(")
    if [[ -n "$bad" ]]; then echo "kernels without _kernel( in their names, which the sanitizers would skip:"; echo "$bad"; exit 1; fi
    echo "every __global__ function of csrc/cuda is named *_kernel"'
  printf '<testsuite><testcase name="t[cuda]"/><testcase name="u[cpu]"/></testsuite>\n' >"$OUT/junit-ran.xml"
  printf '<testsuite><testcase name="t[cuda]"><skipped message="no CUDA GPU"/></testcase></testsuite>\n' >"$OUT/junit-skipped.xml"
  run_step junit-check 30 bash -c '"$1" -c "$2" "$3" && ! "$1" -c "$2" "$4"' _ "$PYTHON" "$JUNIT_CHECK" "$OUT/junit-ran.xml" "$OUT/junit-skipped.xml"
  run_step sanitize-ops-cpu 60 "$PYTHON" bench/sanitize_ops.py --device cpu
  run_step fuzz-cpu 60 "$PYTHON" bench/fuzz_ops.py --device cpu --cases 20
  run_step bench-smoke 90 "$PYTHON" -m bench codec linear --smoke --device cpu --out "$OUT/results"
  # The model scripts belong to their own tests (a smoke run of them takes a minute); here only
  # their side of the harness contract: the options bench/model.py passes them.
  for script in bench/model_*.py; do
    [[ -e "$script" ]] || continue
    run_step "contract-$(basename "$script" .py)" 60 bash -c '"$1" "$2" --help >"$3" && for opt in --device --out --quick --smoke; do grep -q -- "$opt" "$3" || { echo "$2 --help does not offer $opt"; exit 1; }; done && echo "$2 offers --device --out --quick --smoke"' \
      _ "$PYTHON" "$script" "$OUT/$(basename "$script" .py)-help.txt"
  done
  finish
fi

banner "gpu_check in $REPO -> $OUT (python: $PYTHON, budget ${BUDGET}s)"
if [[ -d "$REPO/.gpu_deps/site-packages" ]]; then
  export PYTHONPATH="$REPO/.gpu_deps/site-packages${PYTHONPATH:+:$PYTHONPATH}"
  echo "comparison packages from .gpu_deps/site-packages: $(ls "$REPO/.gpu_deps/site-packages" | grep dist-info | paste -sd ' ' -)"
else
  echo "no .gpu_deps/site-packages: bitsandbytes/torchao cases and rows skip where the image lacks them (bench/stage_gpu_deps.sh)"
fi
{ date -u; nvidia-smi; "$PYTHON" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda)'; nvcc --version; git -C "$REPO" rev-parse HEAD; } >"$OUT/env.txt" 2>&1
run_step preflight 30 bash -c 'nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv && command -v nvcc && command -v cmake && command -v ninja' \
  || finish
ARCH=${QLORA_CUDA_ARCHS:-$(cuda_arch_from "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader)")}
echo "building for CUDA arch $ARCH"
# PIP_BREAK_SYSTEM_PACKAGES: where the preinstalled Python is the distribution's (PEP 668), pip
# would refuse to install into it; these machines are disposable.
# shellcheck disable=SC2046
run_step build 330 env PIP_BREAK_SYSTEM_PACKAGES=1 $(build_command "$ARCH") || finish
# Both ways Python finds qlora_ext must give the CUDA build: the installed package (from OUT) and
# the checkout's (from the repository root, as `python -m bench` does; the build copies the
# library there too, and an older CPU-only one left there would shadow the install).
run_step import 60 bash -c 'for dir in "$1" "$3"; do (cd "$dir" && "$2" -c "
import os, torch, qlora_ext._extension as ext
print(os.getcwd(), \"->\", ext.__file__, ext.BUILD_KIND)
assert ext.WITH_CUDA, \"this qlora_ext has no CUDA kernels: rebuild, or remove a stale qlora_ext/_C.so from the checkout\"
assert torch.cuda.is_available(), \"torch sees no GPU\"
") || exit 1; done' _ "$OUT" "$PYTHON" "$REPO" || finish
# The CUDA cases of the tests, with both sanitizers beside them (the sanitizers are mostly host-side
# instrumentation of a tiny GPU workload). -P: the checkout's qlora_ext folder must not shadow the
# installed package. With xdist, 4 workers of 4 CPU threads each share the CPU-side references.
XDIST=()
"$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
start_step tests 200 env OMP_NUM_THREADS=4 "$PYTHON" -P -m pytest python_tests -q -rs -k cuda ${XDIST[@]+"${XDIST[@]}"} \
  --junitxml "$OUT/pytest-junit.xml"
start_step fuzz 100 env OMP_NUM_THREADS=4 "$PYTHON" bench/fuzz_ops.py --device cuda --seconds 60
if SANITIZER=$(find_sanitizer); then
  # Only our kernels where the sanitizer can filter by name (see sanitizer_options).
  read -r -a SANITIZER_OPTS <<<"$(sanitizer_options "$("$SANITIZER" --help 2>&1)")"
  echo "compute-sanitizer: $SANITIZER, with: ${SANITIZER_OPTS[*]:-no filter (every kernel), API errors reported}"
  # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access
  # past the end of a tensor instead of into a neighbour in the same pooled block.
  start_step memcheck 200 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --leak-check no \
    ${SANITIZER_OPTS[@]+"${SANITIZER_OPTS[@]}"} --error-exitcode 1 --print-limit 20 "$PYTHON" bench/sanitize_ops.py --device cuda
  start_step racecheck 200 "$SANITIZER" --tool racecheck ${SANITIZER_OPTS[@]+"${SANITIZER_OPTS[@]}"} --error-exitcode 1 --print-limit 20 \
    "$PYTHON" bench/sanitize_ops.py --device cuda
else
  SUMMARY+=("FAIL  sanitizers: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, next to nvcc)"); FAILURES=$(( FAILURES + 1 ))
fi
wait_steps
run_step cuda-ran 30 "$PYTHON" -c "$JUNIT_CHECK" "$OUT/pytest-junit.xml"
SHOW=1 run_step codec 90 "$PYTHON" -m bench codec --device cuda --quick --out "$OUT/results"
SHOW=1 run_step linear 150 "$PYTHON" -m bench linear --device cuda --quick --out "$OUT/results"
SHOW=1 run_step train 150 "$PYTHON" -m bench model_train --device cuda --quick --out "$OUT/results"
SHOW=1 run_step build-7b 90 "$PYTHON" -m bench model_build --device cuda --quick --out "$OUT/results"
SHOW=1 run_step seed-7b 240 "$PYTHON" -m bench model_seed_7b --device cuda --quick --out "$OUT/results"
finish
