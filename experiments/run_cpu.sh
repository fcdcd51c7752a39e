#!/usr/bin/env bash
# The smallest honest CPU version of the CIFAR-10 experiment (no GPU in this task): a reduced model
# on a 5k-image subset of the 45k training split, 4 epochs, 5 variants, up to four processes at a time, one thread each.
#   bash experiments/run_cpu.sh DATA_DIR RUNS_DIR
# DATA_DIR: CIFAR-10 python batches (experiments/convert_npz.py writes them). Protocol in experiments/README.md.
# The committed results/cpu_reduced predate issue 11 (simple block, non-identifiable omega); this script now
# builds the authors' block with identifiable omega, so a rerun gives different models.
set -euo pipefail
DATA=${1:?DATA_DIR}; RUNS=${2:?RUNS_DIR}
COMMON=(--dataset cifar10 --data-dir "$DATA" --group-order 8 --widths 8,16 --kernel-size 5 --hidden-channels 16
        --epochs 4 --warmup-epochs 1 --batch-size 64 --lr 2e-3 --val-size 5000 --train-subset 5000 --test-subset 2000
        --seed 0 --device cpu --progress off)
run() {  # variant [extra options]
  local v=$1; shift
  OMP_NUM_THREADS=1 nice -n 10 python -m relaxedconv train "${COMMON[@]}" --variant "$v" "$@" --out "$RUNS/$v" --resume \
    > "$RUNS/$v.log" 2>&1
}
mkdir -p "$RUNS"
( run t2; run se2_rot --omega-rot 2 ) &
run se2 &
run se2_learned --omega-rot 2 --omega-penalty 1e-3 &
run partial &   # started later than the others in the recorded runs, as a fifth variant
wait
python -m relaxedconv report "$RUNS" --out "$RUNS"
