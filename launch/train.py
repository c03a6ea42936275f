#!/usr/bin/env python
"""Train T-MASS with DeepSpeed (also `tmass-train`). All logic lives in tmass.train; `--help` lists the flags.

    deepspeed --num_gpus 8 launch/train.py --deepspeed_config ds_configs/zero2_bf16.json --preset msrvtt \\
        --clip_path /shared/clip-vit-base-patch16 \\
        --train_shards 'shards/msrvtt/train-*.tar' --val_shards 'shards/msrvtt/val-*.tar'
Also runs under torchrun, srun (one task per GPU) and as one plain python process. Relaunching the same
command resumes from the run's latest checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tmass.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
