#!/usr/bin/env bash
# The controlled-symmetry experiment's GPU protocol (relaxedconv symmetry --protocol gpu) as one device
# command that ends within 9 minutes. Prepared without a GPU: it has not been run yet.
#
#   bash experiments/symmetry/run_gpu.sh          (from the repository root)
#
# What it expects on the device machine: torch with CUDA (the target is torch 2.11 + triton 3.6),
# numpy, matplotlib (optional: without it no PNG), and this repository as the working directory. No
# pip install: the repository goes on PYTHONPATH, and since setup.py installs kernels/ as
# relaxedconv.kernels, a symlink relaxedconv/kernels -> ../kernels is made when that import fails
# (an installed relaxedconv works too).
#
# Results go to $OUT/symmetry_gpu (OUT defaults to runs/): one JSON per finished run, summary.json,
# results.md (tables and the issue-11 acceptance checks), symmetry.png, run.log, environment.txt.
# Environment: OUT, JOBS (worker processes sharing the GPU, default 8), BUDGET_S (no run starts after
# this many seconds, default 390), HARD_S (the protocol is killed after this many, default 480);
# PROTOCOL (gpu) and DEVICE (cuda) for a dry run of the plumbing: PROTOCOL=smoke DEVICE=cpu.
# Runs go seed by seed, so a budget-stopped protocol leaves whole seeds; rerunning the same command
# with the same OUT continues where it stopped.
set -uo pipefail
OUT=${OUT:-runs}
JOBS=${JOBS:-8}
BUDGET_S=${BUDGET_S:-390}
HARD_S=${HARD_S:-480}
PROTOCOL=${PROTOCOL:-gpu}
DEVICE=${DEVICE:-cuda}
DEST="$OUT/symmetry_$PROTOCOL"
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c "import relaxedconv.kernels" 2>/dev/null; then
  [ -e relaxedconv/kernels ] || ln -s ../kernels relaxedconv/kernels
  python -c "import relaxedconv.kernels" || { echo "relaxedconv.kernels does not import"; exit 1; }
fi
{ nvidia-smi || true
  python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0]); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
  python -c "import triton; print('triton', triton.__version__)" || true
  git rev-parse HEAD 2>/dev/null || true; nproc; } > "$DEST/environment.txt" 2>&1
cat "$DEST/environment.txt"
t0=$(date +%s)
timeout "$HARD_S" python -m relaxedconv symmetry --protocol "$PROTOCOL" --device "$DEVICE" --jobs "$JOBS" --threads 1 \
  --time-budget "$BUDGET_S" --out "$DEST" 2>&1 | tee -a "$DEST/run.log"
status=${PIPESTATUS[0]}
echo "protocol exit $status after $(( $(date +%s) - t0 )) s" | tee -a "$DEST/run.log"
if [ "$status" -ne 0 ]; then  # killed or failed: summarise whatever finished
  python -m relaxedconv symmetry --protocol "$PROTOCOL" --out "$DEST" --summarise-only 2>&1 | tee -a "$DEST/run.log"
fi
tail -n 40 "$DEST/results.md" 2>/dev/null
