#!/usr/bin/env bash
# The main job on the built-in synthetic corpus, end to end:
#   1. build the synthetic shards (1,000 train / 100 val / 200 test videos) if they are absent;
#   2. train a small T-MASS from scratch with `deepspeed` on 2 ranks (CPU processes here, GPUs where there are);
#   3. evaluate the best checkpoint (by validation R@1) on the held-out test split with the sharded evaluation;
#   4. draw the loss and validation R@1 curves to a PNG.
# --compare also trains and evaluates the X-Pool baseline (--deterministic_text: no text mass) with the same
# budget, and prints both side by side.
# Environment: DATA (shards, default data/synthetic), OUT (runs, default outputs), EPOCHS (default 12).
# Other arguments go to the shard builder.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs}
EPOCHS=${EPOCHS:-12}
COMPARE=0
BUILD_ARGS=()
for a in "$@"; do
  if [ "$a" = "--compare" ]; then COMPARE=1; else BUILD_ARGS+=("$a"); fi
done
python shards/build.py --source synthetic --out "$DATA" "${BUILD_ARGS[@]}"

GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 0 ]; then
  RANKS=$GPUS; DSCONF=ds_configs/zero2_bf16.json
else
  export DS_ACCELERATOR=cpu; RANKS=2; DSCONF=ds_configs/cpu_fp32.json
fi
ntrain=$(ls "$DATA"/train-*.tar | wc -l); ntest=$(ls "$DATA"/test-*.tar | wc -l)
TRAIN="$DATA/train-{000000..$(printf %06d $((ntrain - 1)))}.tar"
TEST="$DATA/test-{000000..$(printf %06d $((ntest - 1)))}.tar"
COMMON=(--preset demo --clip_arch small --input_res 64)

run() {  # run NAME [extra flags]: train, then evaluate the best checkpoint on the test split
  local name=$1; shift
  local port=$((29500 + RANDOM % 1000))
  deepspeed --log_level warning --num_gpus "$RANKS" --master_port "$port" launch/train.py "${COMMON[@]}" "$@" \
    --deepspeed_config "$DSCONF" --batch_size 32 --num_epochs "$EPOCHS" \
    --train_shards "$TRAIN" --val_shards "$DATA/val-000000.tar" --output_dir "$OUT" --exp_name "$name" --log_step 32
  deepspeed --log_level warning --num_gpus "$RANKS" --master_port "$((port + 1))" launch/eval.py "${COMMON[@]}" "$@" \
    --checkpoint "$OUT/$name" --test_shards "$TEST" --results "$OUT/$name/test_results.json" \
    --tensorboard_dir "$OUT/$name/tb"
}

run demo
RUNS=("$OUT/demo")
if [ "$COMPARE" = 1 ]; then
  run demo_xpool --deterministic_text
  RUNS+=("$OUT/demo_xpool")
  python - "$OUT/demo/test_results.json" "$OUT/demo_xpool/test_results.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
cols = ["R@1", "R@5", "R@10", "MdR", "MnR"]
print(f"\n{'held-out test':22}" + "".join(f"{c:>8}" for c in cols))
for name, r in (("T-MASS", a), ("X-Pool baseline", b)):
    for d in ("t2v", "v2t"):
        print(f"{name + ' ' + d:22}" + "".join(f"{r[d][c]:>8.2f}" for c in cols))
PY
fi
python -m tmass.logs "${RUNS[@]}" --out "$OUT/demo/curves.png"
echo "checkpoints: $OUT/demo/checkpoints   TensorBoard: tensorboard --logdir $OUT/demo/tb"
echo "results: $OUT/demo/test_results.json   curves: $OUT/demo/curves.png"
