#!/usr/bin/env python
"""Turn a training checkpoint into one consolidated fp32 HF-style directory (also `tmass-export`).

    python launch/export.py outputs/msrvtt exported/msrvtt            # the best checkpoint (else the newest)
    python launch/export.py outputs/msrvtt exported/msrvtt-last --tag latest
The result evaluates with launch/eval.py --checkpoint, and its CLIP part loads with plain
transformers.CLIPModel.from_pretrained.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tmass.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
