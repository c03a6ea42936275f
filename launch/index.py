#!/usr/bin/env python
"""Index a set of shards for search (also `tmass-index`). All logic lives in tmass.search; `--help` lists the flags.

    deepspeed --num_gpus 8 launch/index.py --checkpoint outputs/tmass --shards 'shards/msrvtt/test-*.tar' \\
        --index index/msrvtt_test
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tmass.cli import index_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(index_main())
