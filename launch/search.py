#!/usr/bin/env python
"""Search an index with text queries (also `tmass-search`). All logic lives in tmass.search; `--help` lists the flags.

python launch/search.py "a man is cooking" --index index/msrvtt_test --top_k 10 --html hits.html
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tmass.cli import search_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(search_main())
