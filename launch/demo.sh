#!/usr/bin/env bash
# The main job on the built-in synthetic corpus, end to end:
#   1. build the synthetic shards (1,000 train / 100 val / 200 test videos) if they are absent;
#   2. train a small T-MASS from scratch with `deepspeed` on 2 ranks (CPU processes here, GPUs where there are);
#   3. evaluate the best checkpoint (by validation R@1) on the held-out test split with the sharded evaluation;
#   4. draw the loss and validation R@1 curves to a PNG.
# --compare [--seeds K] runs the study instead: T-MASS with the paper's recipe (support loss 0.8, dropout 0.3,
# 20 trials) and the X-Pool baseline (--deterministic_text) with the same budget, on the full-caption corpus and
# on the partial-caption one (DATA_PARTIAL), for K seeds (default 3); on the partial corpus also the ablations;
# then python -m tmass.compare prints mean +- std over seeds, the paired differences and each corpus's ceiling (an
# oracle that knows every video's events), and draws the pictures.
# Environment: DATA (shards, default data/synthetic), DATA_PARTIAL (default ${DATA}_partial), OUT (runs, default
# outputs), EPOCHS (default 12). Other arguments go to the shard builder.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs}
EPOCHS=${EPOCHS:-12}
DATA_PARTIAL=${DATA_PARTIAL:-${DATA}_partial}
COMPARE=0; SEEDS=3
BUILD_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --compare) COMPARE=1 ;;
    --seeds) SEEDS=$2; shift ;;
    *) BUILD_ARGS+=("$1") ;;
  esac
  shift
done
python shards/build.py --source synthetic --out "$DATA" "${BUILD_ARGS[@]}"
if [ "$COMPARE" = 1 ]; then
  python shards/build.py --source synthetic --synthetic_captions partial --out "$DATA_PARTIAL" "${BUILD_ARGS[@]}"
fi

GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 0 ]; then
  RANKS=$GPUS; DSCONF=ds_configs/zero2_bf16.json
else
  export DS_ACCELERATOR=cpu; RANKS=2; DSCONF=ds_configs/cpu_fp32.json
fi
shards() {  # shards DIR SPLIT: the brace range of a split's shards
  local n; n=$(ls "$1/$2"-*.tar | wc -l)
  echo "$1/$2-{000000..$(printf %06d $((n - 1)))}.tar"
}
COMMON=(--preset demo --clip_arch small --input_res 64)

run() {  # run DATA NAME [extra flags]: train, then evaluate the best checkpoint on the test split
  local data=$1 name=$2; shift 2
  local port=$((29500 + RANDOM % 1000))
  deepspeed --log_level warning --num_gpus "$RANKS" --master_port "$port" launch/train.py "${COMMON[@]}" "$@" \
    --deepspeed_config "$DSCONF" --batch_size 32 --num_epochs "$EPOCHS" \
    --train_shards "$(shards "$data" train)" --val_shards "$data/val-000000.tar" --output_dir "$OUT" \
    --exp_name "$name" --log_step 32
  evaluate "$data" "$name" test_results.json
}

evaluate() {  # evaluate DATA NAME RESULTS [extra flags]: the run's best checkpoint on the test split
  local data=$1 name=$2 results=$3; shift 3
  deepspeed --log_level warning --num_gpus "$RANKS" --master_port "$((29500 + RANDOM % 1000))" launch/eval.py \
    "${COMMON[@]}" "$@" --checkpoint "$OUT/$name" --test_shards "$(shards "$data" test)" \
    --results "$OUT/$name/$results" --tensorboard_dir "$OUT/$name/tb"
}

if [ "$COMPARE" = 1 ]; then
  RECIPE=(--support_loss_weight 0.8 --transformer_dropout 0.3 --stochastic_trials 20)  # MSR-VTT's, demo-sized
  for corpus in full partial; do
    data=$DATA; [ "$corpus" = partial ] && data=$DATA_PARTIAL
    for seed in $(seq 1 "$SEEDS"); do
      run "$data" "cmp_${corpus}_s${seed}_tmass" "${RECIPE[@]}" --seed "$seed"
      run "$data" "cmp_${corpus}_s${seed}_xpool" --transformer_dropout 0.3 --deterministic_text --seed "$seed"
      if [ "$corpus" = partial ]; then  # the ablations, one change at a time
        run "$data" "cmp_${corpus}_s${seed}_nosupport" "${RECIPE[@]}" --support_loss_weight 0 --seed "$seed"
        evaluate "$data" "cmp_${corpus}_s${seed}_tmass" test_deterministic.json --deterministic_text
        evaluate "$data" "cmp_${corpus}_s${seed}_tmass" test_trials1.json --stochastic_trials 1
        evaluate "$data" "cmp_${corpus}_s${seed}_tmass" test_per_pair.json --trial_noise per_pair
      fi
    done
  done
  python -m tmass.compare "$OUT" --seeds "$SEEDS" --data "full=$DATA,partial=$DATA_PARTIAL"
  exit 0
fi

run "$DATA" demo
python -m tmass.logs "$OUT/demo" --out "$OUT/demo/curves.png"
echo "checkpoints: $OUT/demo/checkpoints   TensorBoard: tensorboard --logdir $OUT/demo/tb"
echo "results: $OUT/demo/test_results.json   curves: $OUT/demo/curves.png"
