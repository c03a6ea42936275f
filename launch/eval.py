#!/usr/bin/env python
"""Sharded, leak-free T-MASS evaluation (also `tmass-eval`). All logic lives in tmass.evaluate; `--help` lists
the flags.

    deepspeed --num_gpus 8 launch/eval.py --checkpoint outputs/msrvtt \\
        --test_shards 'shards/msrvtt/test-*.tar'
    python launch/eval.py --checkpoint model_best.pth --clip_arch ViT-B/32 --clip_path /shared/clip-vit-base-patch32 ...
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tmass.cli import eval_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(eval_main())
