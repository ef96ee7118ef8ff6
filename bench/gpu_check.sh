#!/usr/bin/env bash
# bench/gpu_check.sh — the GPU tests and the GPU benchmarks in one short run (<= 8 min on one
# H100/H200: the step timeouts below add up to 8 min), for the day a GPU is lent.  Run from any directory:
#
#     bash bench/gpu_check.sh            # JSON under ${OUT:-results/gpu_check}
#
# No pip install: the GPU machine's python has torch+CUDA, cupy, scipy, hypothesis and pytest;
# PYTHONPATH points at this checkout.  dask / mlxtend may be missing there: the tests that need
# them skip.  Without a GPU it prints why and exits 0.  Every step runs under `timeout`; a step
# that fails or times out is reported in the summary and the script goes on (exit 1 at the end
# if any step failed).  Nothing is written when there is no GPU.
set -u

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
PY="${PYTHON:-python3}"
RES="${OUT:-results/gpu_check}"
LOG=/dev/null  # the log file exists only once a GPU is found
declare -a SUMMARY=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run CMD under `timeout`, tee its output into the log, record the outcome
step() {
    local name="$1" secs="$2"
    shift 2
    say ""
    say "=== $name (timeout ${secs}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$secs" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local dt=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("ok       ${dt}s  $name")
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        SUMMARY+=("TIMEOUT  ${dt}s  $name (limit ${secs}s)")
        FAILED=1
    else
        SUMMARY+=("FAILED   ${dt}s  $name (exit $rc)")
        FAILED=1
    fi
}

HEAD="$(
echo "# bench/gpu_check.sh in $ROOT, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), results in $RES"
echo "# $(uptime)"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi -L 2>&1
else
    echo "nvidia-smi: not found"
fi
timeout 30 "$PY" - <<'EOF' 2>&1
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, torch.cuda.is_available() = {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB")
try:
    import cupy
    print(f"cupy {cupy.__version__}")
except Exception as exc:  # noqa: BLE001 - report, do not fail
    print(f"cupy: not available ({type(exc).__name__}: {exc})")
print(f"@@cuda={int(torch.cuda.is_available())}")
EOF
)"
echo "$HEAD" | grep -v '^@@'
if ! echo "$HEAD" | grep -q '^@@cuda=1$'; then
    echo ""
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is not True, or torch did not import): nothing to check, exit 0"
    exit 0
fi
mkdir -p "$RES" || exit 1
LOG="$RES/gpu_check.log"
echo "$HEAD" | grep -v '^@@' > "$LOG"

# 1. the GPU tests: the `gpu` marker, then every test named cuda / gpu (the CPU-only ones skip)
step "pytest -m gpu" 75 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
step "pytest -k 'cuda or gpu' (not marked gpu)" 75 "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" \
    -k "cuda or gpu" tests/

# 2. the GPU benchmarks, small sizes (each writes its JSON under $RES)
step "bench.backmap vgg7 linop/identity" 75 "$PY" -m bench.backmap --models vgg7 --dtypes float32 float64 \
    --methods linop identity --device cuda --max-seconds 30 --out "$RES/bench_backmap.json"
step "bench.reconstruct vgg7 (every conv geometry)" 60 "$PY" -m bench.reconstruct --models vgg7 --batch 256 \
    --cg-samples 2 --cg-maxiter 500 --dense-size 0 --device cuda --out "$RES/bench_reconstruct_layers.json"
step "bench.study vgg7 resnet20 float32" 140 "$PY" -m bench.study --images 2 --models vgg7 resnet20 \
    --dtypes float32 --no-dask --timeout 65 --device cuda --out "$RES/bench_study.json"

# 3. the figures
say ""
say "=== summary of figures"
timeout 20 "$PY" - "$RES" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

res = Path(sys.argv[1])

def load(name):
    try:
        return json.loads((res / name).read_text())
    except (OSError, ValueError) as exc:
        print(f"{name}: not available ({exc})")
        return None

d = load("bench_backmap.json")
for r in (d or {}).get("results", []):
    if "error" in r:
        print(f"backmap  {r['model']} {r['dtype']} {r['method']}: failed: {r['error']}")
        continue
    err = max(v["rel_err"] for v in r["layers"].values())
    print(f"backmap  {r['model']} {r['dtype']:8s} {r['method']:9s} {r['device']}: "
          f"{'' if r['complete'] else '>'}{r['total_s']:.3f} s, peak {r['peak_mib']:.0f} MiB, max rel err {err:.1e}")
d = load("bench_reconstruct_layers.json")
for r in (d or {}).get("rows", []):
    fft = f", fft {r['fft_solve_s']:.3f} s" if "fft_solve_s" in r else ""
    print(f"solve    {r['cin']}->{r['cout']} @{r['hw'][0]} s{r['stride'][0]} {r['device']}: exact "
          f"{r['exact_factor_s']:.3f} + {r['exact_solve_s']:.3f} s{fft}, residual {r['residual']:.1e}, "
          f"peak {r.get('cuda_peak_mib', float('nan')):.0f} MiB")
d = load("bench_study.json")
for r in (d or {}).get("results", []):
    if r.get("error") or r.get("skipped"):
        print(f"study    {r['model']} {r['dtype']}: {r.get('error') or r.get('skipped')}")
        continue
    print(f"study    {r['model']} {r['dtype']} {r.get('device')}: {r['images_per_hour']:.0f} images/h "
          f"({r['s_per_image']:.2f} s/image), cuda peak {r.get('cuda_peak_mib', float('nan')):.0f} MiB")
EOF
say ""
for line in "${SUMMARY[@]}"; do say "$line"; done
say "# $(uptime)"
say "# log: $LOG"
exit "$FAILED"
