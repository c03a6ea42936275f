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


def export_tiny(out, tokenizer_dir, num_frames=4, seed=0, perturb=0.0):
    """A tiny random T-MASS exported to `out` (tmass-eval --checkpoint reads it), its text tower sized to the
    tokenizer; perturb > 0 moves the pooling and the radius off their identity init by that much noise."""
    import torch

    from tmass.config import ModelConfig
    from tmass.data.tokenizer import load_tokenizer, text_config_overrides
    from tmass.model.clip import build_clip, clip_config
    from tmass.model.io import export_hf
    from tmass.model.tmass import TMASS

    conf = clip_config("tiny")
    for k, v in text_config_overrides(load_tokenizer(str(tokenizer_dir))).items():
        setattr(conf.text_config, k, v)
    torch.manual_seed(seed)
    model = TMASS(ModelConfig(clip_arch="tiny", num_frames=num_frames), clip=build_clip(config=conf))
    with torch.no_grad():
        for p in list(model.pool_frames.parameters()) + list(model.radius.parameters()):
            p.add_(perturb * torch.randn_like(p))
    export_hf(model, str(out))
    return out


@pytest.fixture(scope="session")
def exported(tmp_path_factory, synthetic_shards):
    """The tiny model of the evaluation tests (4 frames, 32 px), exported."""
    return export_tiny(tmp_path_factory.mktemp("exported"), synthetic_shards / "tokenizer")


@pytest.fixture(autouse=True)
def no_process_group_variables_after_a_test():
    """A test that starts the process group in this process leaves MASTER_PORT and the rank variables in
    os.environ, and this process holds that port: a later test's child would inherit them and fail to bind."""
    yield
    from _procs import DIST_VARS

    for key in DIST_VARS:
        os.environ.pop(key, None)
