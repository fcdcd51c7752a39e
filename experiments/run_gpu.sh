#!/usr/bin/env bash
# The reduced GPU protocol of experiments/README.md for the four first variants, in one command.
#
#   bash experiments/run_gpu.sh [NPZ_DIR]          (NPZ_DIR default: data_local/npz)
#
# NPZ_DIR holds cifar10-train-jpeg.npz and cifar10-test-jpeg.npz (the offline copy; 56 MB, so it can
# be carried to a device machine: run tool with carry=["data_local/npz"]). They are converted to
# CIFAR python batches in a temporary folder, then each variant trains with the full model of
# design.md §7 on the 45k/5k split for $EPOCHS epochs. Each run is capped at $PER_RUN_S seconds
# (a capped run keeps its per-epoch metrics in $OUT; its checkpoint stays in $WORK, so --resume can finish it only
# on the same machine, e.g. the same command again while the device machine is still warm).
# Results (config, metrics, final numbers, omegas, equivariance errors, logs, report) go to $OUT.
#
# Environment: OUT (default runs/gpu), EPOCHS (5), PER_RUN_S (130: four runs + conversion fit one 600 s call), SEED (0),
#              VARIANTS ("t2 se2 se2_rot se2_learned"), WORK (scratch, /tmp/relaxedconv_gpu), ALLOW_CPU.
set -uo pipefail
NPZ=${1:-data_local/npz}
OUT=${OUT:-runs/gpu}
EPOCHS=${EPOCHS:-5}
PER_RUN_S=${PER_RUN_S:-130}
SEED=${SEED:-0}
VARIANTS=${VARIANTS:-"t2 se2 se2_rot se2_learned"}
WORK=${WORK:-/tmp/relaxedconv_gpu}
mkdir -p "$OUT" "$WORK/runs"

python -c "import relaxedconv.kernels" 2>/dev/null || pip install -q --no-deps --no-build-isolation -e . \
  || { echo "could not install relaxedconv"; exit 1; }
{ nvidia-smi || true; python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0]); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"; git rev-parse HEAD 2>/dev/null || true; } > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
if [ -z "${ALLOW_CPU:-}" ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: stopping (ALLOW_CPU=1 runs the same protocol on CPU, far slower)"; exit 3
fi

t0=$(date +%s)
python experiments/convert_npz.py "$NPZ" "$WORK/cifar10" || exit 2
echo "conversion: $(( $(date +%s) - t0 )) s"

PROTOCOL=(--dataset cifar10 --data-dir "$WORK/cifar10" --group-order 8 --widths 32,64 --kernel-size 7
          --hidden-channels 32 --omega-rel 10 --epochs "$EPOCHS" --warmup-epochs 1 --batch-size 64 --lr 1e-3
          --val-size 5000 --seed "$SEED" --augment on --amp auto --progress off)
declare -A EXTRA=([se2_rot]="--omega-rot 2" [se2_learned]="--omega-rot 2 --omega-penalty 1e-3"
                  [se2_trans]="--omega-pos 1" [se2_rot_trans]="--omega-rot 2 --omega-pos 1")
for v in $VARIANTS; do
  t=$(date +%s)
  # shellcheck disable=SC2086
  timeout "$PER_RUN_S" python -m relaxedconv train "${PROTOCOL[@]}" --variant "$v" ${EXTRA[$v]:-} \
    --out "$WORK/runs/$v" --resume > "$OUT/$v.log" 2>&1
  echo "$v: exit $? after $(( $(date +%s) - t )) s"; tail -n 2 "$OUT/$v.log"
  mkdir -p "$OUT/$v" && cp "$WORK/runs/$v"/*.json* "$OUT/$v/" 2>/dev/null
done
python -m relaxedconv report "$OUT" --out "$OUT" || true
