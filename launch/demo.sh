#!/usr/bin/env bash
# The main job on the built-in synthetic corpus.
# Today: build the synthetic shards (1,000 train / 100 val / 200 test videos) if they are absent, and print
# the manifest summary. Training and evaluation join this script as they land (see README, "Status").
#   bash launch/demo.sh                 # shards in data/synthetic
#   DATA=/tmp/syn bash launch/demo.sh   # elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synthetic}
python shards/build.py --source synthetic --out "$DATA" "$@"
echo "shards and manifests: $DATA"
