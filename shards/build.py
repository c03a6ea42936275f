#!/usr/bin/env python
"""Videos + captions -> WebDataset shards. All logic lives in tmass.shards; see --help."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tmass.shards.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
