import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture
def fixtures_dir():
    return FIXTURES


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """A small synthetic corpus: train 20 videos in shards of 6, 6, 6, 2 (uneven); val 4; test 7 in 2 shards."""
    from tmass.shards.cli import main

    out = tmp_path_factory.mktemp("synthetic")
    assert main(["--source", "synthetic", "--out", str(out), "--num_train", "20", "--num_val", "4", "--num_test", "7",
                 "--max_count", "6", "--workers", "2", "--no_progress", "--captions_per_video", "3"]) == 0
    return out


@pytest.fixture(autouse=True)
def no_process_group_variables_after_a_test():
    """A test that starts the process group in this process leaves MASTER_PORT and the rank variables in
    os.environ, and this process holds that port: a later test's child would inherit them and fail to bind."""
    yield
    from _procs import DIST_VARS

    for key in DIST_VARS:
        os.environ.pop(key, None)
