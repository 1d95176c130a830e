#!/usr/bin/env bash
# Check a CUDA machine before long work, in one command: the CUDA tests (pytest -m cuda, torch.compile
# included), the inference benchmark, the training-step benchmark and the inference benchmark with
# --compile. The reports land in OUT_DIR (five files: summary.txt, check_gpu.log, bench_inference.json,
# bench_training.json, bench_inference_compile.json); a failing step is reported and the next one
# runs; exit 1 if any step failed.
#   scripts/check_gpu.sh --out OUT_DIR [--device cuda|cuda:N] [--seconds 4] [--skip tests,compile,training]
#       [--step-timeout S] [--tiny] [--overwrite]
# --step-timeout S stops a step after S seconds (FAILED (exit 124), or 137 when it had to be killed 20 s
# later) so the next one runs.
# --tiny runs the benchmarks on the tiny test networks (a smoke test of the set-up, a minute or two).
# PYTHON=/path/to/python uses that interpreter (one with a CUDA build of PyTorch) instead of .venv.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  echo "usage: scripts/check_gpu.sh --out OUT_DIR [--device cuda|cuda:N] [--seconds S]" \
    "[--skip tests,compile,training] [--step-timeout S] [--tiny] [--overwrite]"
}
die() {
  echo "error: $*" >&2
  exit 2
}

OUT="" DEVICE=cuda SECONDS_OF_VIDEO=4 SKIP="" TINY=() OVERWRITE=0 STEP_TIMEOUT=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help)
      usage
      sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    --out | --device | --seconds | --skip | --step-timeout)
      [ $# -ge 2 ] || die "argument $1: expected one argument (see scripts/check_gpu.sh --help)"
      case "$1" in
        --out) OUT="$2" ;;
        --device) DEVICE="$2" ;;
        --seconds) SECONDS_OF_VIDEO="$2" ;;
        --skip) SKIP="$2" ;;
        --step-timeout) STEP_TIMEOUT="$2" ;;
      esac
      shift 2
      ;;
    --tiny) TINY=(--tiny) && shift ;;
    --overwrite) OVERWRITE=1 && shift ;;
    *) die "unrecognized argument: $1 (see scripts/check_gpu.sh --help)" ;;
  esac
done
[ -n "$OUT" ] || die "--out OUT_DIR is required (see scripts/check_gpu.sh --help)"
for s in ${SKIP//,/ }; do
  case "$s" in tests | compile | training) ;; *) die "--skip $s: use tests, compile or training" ;; esac
done
if ! [[ "$SECONDS_OF_VIDEO" =~ ^[0-9]+([.][0-9]+)?$ ]] || [[ "$SECONDS_OF_VIDEO" =~ ^0+([.]0+)?$ ]]; then
  die "--seconds $SECONDS_OF_VIDEO: give a number of seconds above 0"
fi
case "$STEP_TIMEOUT" in
  '' | *[!0-9]*) die "--step-timeout $STEP_TIMEOUT: give whole seconds (0: none)" ;;
esac
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # the steps run in the repo root
if [ -e "$OUT" ] && [ ! -d "$OUT" ]; then
  die "--out $OUT is a file, not a folder"
fi
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ "$OVERWRITE" != 1 ]; then
  die "--out $OUT already holds files; pass --overwrite to replace this check's reports there"
fi
# shellcheck source=scripts/_setup_python.sh
source "$ROOT/scripts/_setup_python.sh"
# shellcheck source=scripts/_allocator.sh
source "$ROOT/scripts/_allocator.sh"
cd "$ROOT" || exit 2
PROBE="$("$PY" -c 'import platform, sys, torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
if not torch.cuda.is_available():
    print("no CUDA device visible to PyTorch")
sys.exit(0 if torch.cuda.is_available() else 3)' 2>&1)"
HAS_CUDA=$?  # 0: PyTorch sees a GPU
INFO="$(
  echo "check_gpu: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), device $DEVICE, Python $PY"
  echo "$PROBE"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
)"
if [[ "$DEVICE" == cuda* ]] && [ "$HAS_CUDA" != 0 ]; then
  echo "$INFO" >&2
  echo "error: --device $DEVICE: PyTorch sees no CUDA device" >&2
  exit 2
fi
mkdir -p "$OUT" || die "cannot create --out $OUT"
if [ "$OVERWRITE" = 1 ]; then
  rm -f "$OUT"/{summary.txt,check_gpu.log,bench_training.json}
  rm -f "$OUT"/{bench_inference.json,bench_inference_compile.json}
fi

LOG="$OUT/check_gpu.log" SUMMARY="$OUT/summary.txt" FAILED=0
: >"$LOG"
echo "$INFO" | tee "$SUMMARY"

skipped() { [[ ",$SKIP," == *",$1,"* ]]; }
# Ctrl-C or a TERM stops the check: the running step is ended (it runs in the background, where a
# script's children do not get the terminal's Ctrl-C, so the trap passes it on) and no later step runs
CHILD="" INTERRUPTED=0
on_signal() {
  INTERRUPTED=1
  [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
}
trap on_signal INT TERM
step() {  # step NAME COMMAND...: run, log, and add one line to the summary
  local name="$1" start rc
  shift
  start=$(date +%s)
  echo "== $name: $*" | tee -a "$LOG"
  if [ "$STEP_TIMEOUT" -gt 0 ]; then
    timeout --kill-after=20 "$STEP_TIMEOUT" "$@" >>"$LOG" 2>&1 &
  else
    "$@" >>"$LOG" 2>&1 &
  fi
  CHILD=$!
  wait "$CHILD"
  rc=$?
  while kill -0 "$CHILD" 2>/dev/null; do  # wait was cut short by the signal: let the step end
    wait "$CHILD"
    rc=$?
  done
  CHILD=""
  if [ "$INTERRUPTED" = 1 ]; then
    echo "$name: interrupted; the check stops here" | tee -a "$SUMMARY" "$LOG" >&2
    exit 130
  fi
  local line
  line="$(printf '%-28s %s in %d s' "$name" "$([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)")" \
    $(($(date +%s) - start)))"
  if [ "$name" = "CUDA tests" ]; then  # pytest's closing line: how many passed, failed, skipped
    line="$line: $(grep -E '(passed|failed|skipped|error)' "$LOG" | tail -n 1 | tr -d '=' | xargs)"
  fi
  echo "$line" | tee -a "$SUMMARY" "$LOG"
  [ $rc = 0 ] || FAILED=1
}

export PYTHONUNBUFFERED=1
if ! skipped tests; then
  TEST_ENV=(RUN_SLOW=1)
  if [[ "$DEVICE" =~ ^cuda:([0-9]+)$ ]]; then  # the tests use "cuda": make GPU N the only one they see
    gpu="${BASH_REMATCH[1]}"
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
      IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
      gpu="${visible[$gpu]:-$gpu}"
    fi
    TEST_ENV+=(CUDA_VISIBLE_DEVICES="$gpu")
  fi
  step "CUDA tests" env "${TEST_ENV[@]}" "$PY" -m pytest -q -p no:cacheprovider -rs -m cuda tests
fi
BENCH=(--device "$DEVICE" --seconds "$SECONDS_OF_VIDEO" "${TINY[@]}")
step "inference benchmark" "$PY" -m benchmarks.inference "${BENCH[@]}" --json "$OUT/bench_inference.json"
if ! skipped training; then
  step "training benchmark" "$PY" -m benchmarks.training --device "$DEVICE" "${TINY[@]}" \
    --json "$OUT/bench_training.json"
fi
if ! skipped compile; then
  step "inference, --compile" "$PY" -m benchmarks.inference "${BENCH[@]}" --compile \
    --json "$OUT/bench_inference_compile.json"
fi
echo "reports: $OUT" | tee -a "$SUMMARY"
exit "$FAILED"
