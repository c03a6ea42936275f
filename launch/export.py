#!/usr/bin/env python
"""Turn a training checkpoint into one consolidated fp32 HF-style directory (zero_to_fp32 underneath).

    python launch/export.py outputs/msrvtt exported/msrvtt            # the latest checkpoint
    python launch/export.py outputs/msrvtt exported/msrvtt-best --tag best
The result loads with tmass.model.io.load_hf, evaluates with launch/eval.py --checkpoint, and its CLIP part
with plain transformers.CLIPModel.from_pretrained.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tmass.train import export_checkpoint  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (outputs/EXP) or its checkpoints/ directory")
    p.add_argument("out", help="the export directory")
    p.add_argument("--tag", default=None, help="latest (default), best, or stepN")
    a = p.parse_args()
    print(export_checkpoint(a.run, a.out, a.tag))
