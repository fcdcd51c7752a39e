#!/usr/bin/env bash
# The one GPU check (issues 6, 9, 10, 13). From the repository root:
#
#     bash bench/device_check.sh                       # every step, ~25 min worst case (over one call)
#     STEPS="tests kernels" bash bench/device_check.sh # only some steps (a command may run 10 min:
#                                                      # split the check over two calls if needed)
#
# Steps, each under its own `timeout` so that one hung step does not lose the others
# (worst case ~25 min; the benchmark steps also stop starting new measurements at their budget
# and rewrite their JSON after every measurement, so a killed step keeps what it measured).
# A step's budget plus one row's limit may exceed its timeout on purpose: a row that starts late
# still fits when it is short, and one the timeout cuts loses only itself (the step then reads
# TIMED OUT, rc 124, with every earlier row in its JSON):
#
#   0. environment (nvidia-smi, versions) and install (pip -e, no network)          <= 45 s
#   1. tests:   python -m pytest -q tests, on CUDA (kernels compiled, not interpreted),  150 s
#               in 8 processes when pytest-xdist is there (one process did 77% in 150 s)
#   2. kernels: every step of the fused path timed beside the cost model (T1, T2, G4),   90 s
#               dX by both routes (v + fold, dx direct) and the route each shape chose
#      split:   host vs device time of kernel net and convolution (T1, T2, G4), default  60 s
#               kernel net and the fused one (RELAXEDCONV_FUSED_KERNEL_NET=1)
#   3. layers:  layer benchmark, every case in bf16, 6 backends, budget 115 s;          210 s
#               then T1, T2, G4 in tf32, budget 45 s
#      compiled: T1, T2 (bf16) under torch.compile: Inductor (triton, conv2d,              250 s
#               factored_torch; budget 100 s), then CUDA graphs (reduce-overhead:
#               triton, conv2d; budget 80 s): what the layer costs once the kernel
#               net is fused and the host's per-operator cost is gone
#      fused_knet: T1, T2 (bf16, triton) with the fused Triton kernel net                 100 s
#               (RELAXEDCONV_FUSED_KERNEL_NET=1), eager (budget 25 s) and under CUDA
#               graphs (its custom operators; budget 45 s)
#      fused_knet_e2e: the rotation+translation-relaxed SE(2)-8 step (triton) with it,    130 s
#               under CUDA graphs (beside graphs_trans's row without it)
#   4. e2e:     training step (design.md §7 model), bf16 autocast, budget 50 s,          75 s
#               every row under its own 25 s limit, the plain-conv floor row first
#      graphs:  the strict and rotation-relaxed SE(2)-8 steps under torch.compile        150 s
#               reduce-overhead (CUDA graphs), each beside its plain-conv floor
#      graphs_trans: the rotation+translation-relaxed SE(2)-8 step (triton) the same way  130 s
#   5. auto:    one-off cost of auto's measurement per new shape (G1, G4, T1, T2)        45 s
#   6. pytest_bench: pytest-benchmark entries (G4, T2), GPU-synchronised                  35 s
#
# Through the device tool (at most 8 files come back): OUT=/tmp/r bash bench/device_check.sh;
# tar czf "$OUT/r.tgz" -C /tmp/r .
# Output: "$OUT" (bench/results/ when OUT is unset), flat files:
#   device_summary.txt  tests.log  kernel_steps.log  kernel_steps.json  time_split{,_fused}.{log,json}
#   bench_layers{,_tf32,_compiled,_graphs,_fused_knet,_fused_knet_graphs}.{log,json}
#   bench_e2e{,_graphs,_graphs_trans,_graphs_trans_fused_knet}.{log,json}  auto_cost.log  pytest_bench.log
# Worst case of all steps ~25 min (the limits add up to 1,470 s), more than a session's 15 device minutes: choose. Calls of <= 10 min,
# e.g. STEPS="tests kernels split fused_knet" (~7 min with the install: the GPU tests of new kernels first),
# STEPS="layers compiled" (~7.7 min), STEPS="e2e graphs graphs_trans fused_knet_e2e" (~8 min),
# STEPS="auto pytest_bench".
# Exit status: 0 when every step passed, else 1 (all steps run regardless); 2 (nothing run) when STEPS names
# a step that does not exist. Check the command lines on a CPU first: pytest tests/test_benchmark_runner.py -k device_check.
set -u -o pipefail
export PYTHONUNBUFFERED=1
# Each step is a new process: keep the autotuner's timings on disk so later steps (and a second
# call on a warm machine) reuse them instead of timing every config of every kernel again.
export TRITON_CACHE_AUTOTUNING="${TRITON_CACHE_AUTOTUNING:-1}"
cd "$(dirname "$0")/.."

ALL_STEPS="tests kernels split layers compiled fused_knet e2e graphs graphs_trans fused_knet_e2e auto pytest_bench"
STEPS="${STEPS:-$ALL_STEPS}"
# A misspelt step would be skipped without a word, and the session's device minutes spent on the rest.
for step in $STEPS; do
  case " $ALL_STEPS " in
    *" $step "*) ;;
    *) echo "device_check.sh: unknown step '$step' in STEPS; expected some of: $ALL_STEPS" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
SUMMARY="$OUT/device_summary.txt"
: > "$SUMMARY"
FAILED=0
PY="${PYTHON:-python}"

log() { echo "$*" | tee -a "$SUMMARY"; }
want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run_step NAME TIMEOUT_S CMD...: output to $OUT/NAME.log; rc, time and the log's tail to the summary.
run_step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc note=""
  t0=$(date +%s)
  log ""
  log "== $name (timeout ${limit}s): $*"
  timeout -s INT -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (TIMED OUT)"; fi
  log "   rc=$rc after $(( $(date +%s) - t0 ))s$note"
  tail -n 8 "$OUT/$name.log" | sed 's/^/   | /' | tee -a "$SUMMARY"
  if [ "$rc" -ne 0 ]; then FAILED=1; fi
  return 0
}

# ---- 0. environment and install -------------------------------------------------------------
log "device_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd); OUT=$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"; } | tee -a "$SUMMARY"
if ! "$PY" -c "import relaxedconv.kernels" > /dev/null 2>&1; then
  # relaxedconv.kernels is kernels/ mapped by setup.py; an editable install makes it importable.
  timeout 45 "$PY" -m pip install --no-deps --no-build-isolation -q -e . >> "$SUMMARY" 2>&1 \
    || log "pip install -e . failed"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch, triton, relaxedconv, relaxedconv.kernels
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
      f"triton {triton.__version__}, relaxedconv {relaxedconv.__version__} from {relaxedconv.__file__}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE: the CUDA steps will not run on a GPU")
EOF

# ---- 1. tests on CUDA ------------------------------------------------------------------------
# -v: every test's outcome is in tests.log as it finishes, so a step cut by its timeout still names
# its failures (a -q run cut before its summary did not, 2026-11-27); --timeout fails a hung test alone.
XDIST=()
if "$PY" -c "import xdist" > /dev/null 2>&1; then XDIST=(-n 8); fi
if "$PY" -c "import pytest_timeout" > /dev/null 2>&1; then XDIST+=(--timeout 100); fi
want tests && run_step tests 150 "$PY" -m pytest -v -rf -p no:cacheprovider --durations=15 "${XDIST[@]}" tests
want tests && { grep -E "(FAILED|ERROR) " "$OUT/tests.log" | sort -u | head -40 | sed 's/^/   | /' | tee -a "$SUMMARY"; }

# ---- 2. the fused path step by step, beside the cost model ------------------------------------
want kernels && run_step kernel_steps 90 "$PY" -m relaxedconv.kernels.step_bench --cases T1,T2,G4 \
  --json "$OUT/kernel_steps.json"

# ---- 2b. host vs device time of each part (kernel net, convolution), PyTorch and fused kernel net
want split && run_step time_split 30 "$PY" -m relaxedconv.benchmark.time_split --cases T1,T2,G4 --backends triton \
  --json "$OUT/time_split.json"
want split && RELAXEDCONV_FUSED_KERNEL_NET=1 run_step time_split_fused 30 "$PY" -m relaxedconv.benchmark.time_split \
  --cases T1,T2,G4 --backends triton --json "$OUT/time_split_fused.json"

# ---- 3. layer benchmark ------------------------------------------------------------------------
# Cases in priority order (the issue's targets first); the budget cuts the batch/size variants.
# bf16 first, every case (the issue's table, then T2-b64-32px and the batch/size variants), tf32 apart:
# with both dtypes in one run the tf32 rows of G3 took the budget before T2-b64-32px (2026-11-27).
want layers && run_step bench_layers 150 "$PY" -m relaxedconv.benchmark --suite layers \
  --cases T1,T2,G3,G4,G1,G2,T2-b64-32px,G1-b1,G1-b256,G1-64px,T1-b1,T1-b256,T1-64px \
  --dtypes bf16 --warmup-ms 10 --rep-ms 50 --time-budget 115 --json "$OUT/bench_layers.json"
want layers && run_step bench_layers_tf32 60 "$PY" -m relaxedconv.benchmark --suite layers \
  --cases T1,T2,G4 --dtypes tf32 --warmup-ms 10 --rep-ms 50 --time-budget 45 --json "$OUT/bench_layers_tf32.json"

# ---- 3b. the translation-relaxed layers compiled: Inductor, then CUDA graphs -------------------
want compiled && run_step bench_layers_compiled 140 "$PY" -m relaxedconv.benchmark --suite layers \
  --cases T1,T2 --dtypes bf16 --backends triton,conv2d,factored_torch --layer-compile default \
  --warmup-ms 10 --rep-ms 50 --time-budget 100 --json "$OUT/bench_layers_compiled.json"
# (T1's two rows took 28 s of compiling and recording on the H200, 2026-11-27)
want compiled && run_step bench_layers_graphs 110 "$PY" -m relaxedconv.benchmark --suite layers \
  --cases T1,T2 --dtypes bf16 --backends triton,conv2d --layer-compile reduce-overhead \
  --warmup-ms 10 --rep-ms 50 --time-budget 80 --json "$OUT/bench_layers_graphs.json"

# ---- 3c. the fused Triton kernel net (opt-in until measured): eager, then under CUDA graphs --------
want fused_knet && RELAXEDCONV_FUSED_KERNEL_NET=1 run_step bench_layers_fused_knet 40 "$PY" -m relaxedconv.benchmark \
  --suite layers --cases T1,T2 --dtypes bf16 --backends triton --warmup-ms 10 --rep-ms 50 --time-budget 25 \
  --json "$OUT/bench_layers_fused_knet.json"
want fused_knet && RELAXEDCONV_FUSED_KERNEL_NET=1 run_step bench_layers_fused_knet_graphs 60 "$PY" -m relaxedconv.benchmark \
  --suite layers --cases T2,T1 --dtypes bf16 --backends triton --layer-compile reduce-overhead \
  --warmup-ms 10 --rep-ms 50 --time-budget 45 --json "$OUT/bench_layers_fused_knet_graphs.json"

# ---- 4. end-to-end figure ----------------------------------------------------------------------
want e2e && run_step bench_e2e 75 "$PY" -m relaxedconv.benchmark --suite e2e --e2e-dtype bf16 \
  --row-time-limit 25 --e2e-variants t2,se2,se2_rot,se2_rot_trans --e2e-backends conv2d,expand_conv,auto,triton,factored_torch,materialize \
  --time-budget 50 --json "$OUT/bench_e2e.json"
want graphs && run_step bench_e2e_graphs 150 "$PY" -m relaxedconv.benchmark --suite e2e --e2e-dtype bf16 \
  --row-time-limit 60 --e2e-variants se2,se2_rot --e2e-backends expand_conv,conv2d --e2e-compile reduce-overhead \
  --time-budget 130 --json "$OUT/bench_e2e_graphs.json"

# The rotation- and translation-relaxed SE(2)-8 model (the layers nothing but triton runs) under
# CUDA graphs, beside its floor: eager, its step did not finish one measurement in 80 s at ec67431.
want graphs_trans && run_step bench_e2e_graphs_trans 130 "$PY" -m relaxedconv.benchmark --suite e2e --e2e-dtype bf16 \
  --row-time-limit 90 --e2e-variants se2_rot_trans --e2e-backends triton,conv2d --e2e-compile reduce-overhead \
  --time-budget 110 --json "$OUT/bench_e2e_graphs_trans.json"

want fused_knet_e2e && RELAXEDCONV_FUSED_KERNEL_NET=1 run_step bench_e2e_graphs_trans_fused_knet 130 "$PY" -m relaxedconv.benchmark \
  --suite e2e --e2e-dtype bf16 --row-time-limit 90 --e2e-variants se2_rot_trans --e2e-backends triton \
  --e2e-compile reduce-overhead --time-budget 110 --json "$OUT/bench_e2e_graphs_trans_fused_knet.json"

# ---- 5. one-off cost of auto's measurement (README "backend='auto'") ---------------------------
want auto && run_step auto_cost 45 "$PY" -m relaxedconv.benchmark.auto_cost --cases G1,G4,T1,T2

# ---- 6. pytest-benchmark -----------------------------------------------------------------------
if ! want pytest_bench; then
  :
elif "$PY" -c "import pytest_benchmark" > /dev/null 2>&1; then
  run_step pytest_bench 35 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_layers.py -k "G4 or T2" \
    --benchmark-columns=min,median,max,rounds --benchmark-sort=name
else
  log ""
  log "== pytest_bench: skipped (pytest-benchmark is not installed)"
fi

# ---- summary: targets and e2e from the JSON (even when a step was cut short) -------------------
log ""
log "== summary"
"$PY" - "$OUT/bench_layers.json" "$OUT/bench_layers_tf32.json" "$OUT/bench_layers_compiled.json" "$OUT/bench_layers_graphs.json" \
  "$OUT/bench_layers_fused_knet.json" "$OUT/bench_layers_fused_knet_graphs.json" \
  "$OUT/bench_e2e.json" "$OUT/bench_e2e_graphs.json" "$OUT/bench_e2e_graphs_trans.json" \
  "$OUT/bench_e2e_graphs_trans_fused_knet.json" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, os, sys
from relaxedconv.benchmark import report
for path in sys.argv[1:]:
    if not os.path.exists(path):
        print(f"{path}: missing")
        continue
    try:
        d = json.load(open(path))
        m = d["meta"]
    except (ValueError, KeyError, TypeError) as e:  # one unreadable file must not hide the others
        print(f"{path}: unreadable ({type(e).__name__}: {e})")
        continue
    print(f"{path}: {m['card']} | torch {m['torch']} | triton {m['triton']} | {m['date']} | {d['elapsed_s']} s")
    if d.get("layers"):
        rows = d["layers"]
        counts = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        print("rows:", counts)
        print(report.targets_table(d.get("targets") or report.targets(rows)))
        main = [r for r in rows if r["case"] in ("T1", "T2", "G3", "G4")]  # each file holds one dtype (bf16, tf32)
        print(report.layer_table(main))
    if d.get("e2e"):
        print(report.e2e_table(d["e2e"]))
EOF
log ""
log "device_check.sh done: $([ "$FAILED" -eq 0 ] && echo 'all steps passed' || echo 'some step failed or timed out')"
exit "$FAILED"
