#!/usr/bin/env bash
# The main job on the built-in synthetic corpus, end to end:
#   1. build the synthetic shards (1,000 train / 100 val / 200 test videos) if they are absent;
#   2. train a small T-MASS from scratch with `deepspeed` on 2 ranks (CPU processes here, GPUs where there are);
#   3. evaluate the best checkpoint (by validation R@1) on the held-out test split with the sharded evaluation.
# Environment: DATA (shards, default data/synthetic), OUT (runs, default outputs), EPOCHS (default 12).
# Extra arguments go to the shard builder.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs}
EPOCHS=${EPOCHS:-12}
python shards/build.py --source synthetic --out "$DATA" "$@"

GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 0 ]; then
  RANKS=$GPUS; DSCONF=ds_configs/zero2_bf16.json
else
  export DS_ACCELERATOR=cpu; RANKS=2; DSCONF=ds_configs/cpu_fp32.json
fi
TRAIN=$(ls "$DATA"/train-*.tar | sed -n '1p;$p' | sed 's/.*train-\([0-9]*\)\.tar/\1/' | paste -sd' ')
read -r FIRST LAST <<< "$TRAIN"
COMMON=(--preset demo --clip_arch small --input_res 64)
PORT=$((29500 + RANDOM % 1000))
deepspeed --num_gpus "$RANKS" --master_port "$PORT" launch/train.py "${COMMON[@]}" \
  --deepspeed_config "$DSCONF" --batch_size 32 --num_epochs "$EPOCHS" \
  --train_shards "$DATA/train-{$FIRST..$LAST}.tar" --val_shards "$DATA/val-000000.tar" \
  --output_dir "$OUT" --exp_name demo --log_step 32
deepspeed --num_gpus "$RANKS" --master_port "$((PORT + 1))" launch/eval.py "${COMMON[@]}" \
  --checkpoint "$OUT/demo" --test_shards "$DATA/test-{000000..$(printf %06d $(( $(ls "$DATA"/test-*.tar | wc -l) - 1 )))}.tar" \
  --results "$OUT/demo/test_results.json" --tensorboard_dir "$OUT/demo/tb"
echo "checkpoints: $OUT/demo/checkpoints   TensorBoard: tensorboard --logdir $OUT/demo/tb   results: $OUT/demo/test_results.json"
