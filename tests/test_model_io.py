"""Loading: local CLIP checkpoints, upstream T-MASS .pth files, and the HF-style export round trip."""
import json

import pytest
import torch
from transformers import CLIPModel

import _reference as ref
from tmass.errors import ConfigError, DataError
from tmass.config import ModelConfig
from tmass.model.clip import build_clip, clip_config
from tmass.model.io import CheckpointMismatch, export_hf, load_hf, load_upstream
from tmass.model.tmass import TMASS

F = 4


def upstream_state(seed=0):
    """A state dict laid out as the released T-MASS checkpoints are, made from a tiny CLIP
    and random head weights, with the stale buffers and the uninitialised scalar."""
    torch.manual_seed(seed)
    clip = CLIPModel(clip_config("tiny"))
    state = {f"clip.{k}": v.clone() for k, v in clip.state_dict().items()}
    assert state["clip.logit_scale"].dim() == 0
    state["clip.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    state["clip.vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)
    D = 32
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        state[f"pool_frames.cross_attn.{name}.weight"] = torch.eye(D) + 0.2 * torch.randn(D, D)
        state[f"pool_frames.cross_attn.{name}.bias"] = 0.1 * torch.randn(D)
    state["pool_frames.linear_proj.weight"] = torch.eye(D) + 0.2 * torch.randn(D, D)
    state["pool_frames.linear_proj.bias"] = 0.1 * torch.randn(D)
    for i in (1, 2, 3):
        state[f"pool_frames.layer_norm{i}.weight"] = 1 + 0.1 * torch.randn(D)
        state[f"pool_frames.layer_norm{i}.bias"] = 0.1 * torch.randn(D)
    state["stochastic.std_branch.linear_proj.weight"] = torch.eye(D, F) + 0.1 * torch.randn(D, F)
    state["stochastic.std_branch.linear_proj.bias"] = 0.1 * torch.randn(D)
    state["stochastic.std_branch.learnable_scalar"] = torch.empty(1)
    return state


def inputs(B=3, L=9):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 49000, (B, L), generator=g)
    ids[:, -1] = 49407
    return ids, torch.ones(B, L, dtype=torch.long), torch.randn(B, F, 3, 32, 32, generator=g)


def fresh(**kw):
    return TMASS(ModelConfig(clip_arch="tiny", num_frames=F, transformer_dropout=0.0, **kw))


def test_upstream_checkpoint_loads_and_gives_the_reference_outputs(tmp_path):
    state = upstream_state()
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 5, "state_dict": state, "optimizer": {"state": {}}}, path)
    model = fresh(support_loss_weight=0.8)
    assert load_upstream(model, str(path)) == {"epoch": 5}
    model.eval()
    ids, mask, video = inputs()
    eps = torch.rand(3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t, f = model.encode_text(ids, mask), model.encode_frames(video)
        out = model(ids, mask, video, eps)
    # the reference reads the upstream tensors by their upstream names
    sd = {k: v.double() for k, v in state.items()}
    expected = ref.tmass_loss(t.double(), f.double(), eps.double(), sd, state["clip.logit_scale"].exp().item(),
                              0.8, radius_prefix="stochastic.std_branch.linear_proj.")
    assert abs(out["loss"].item() - expected) < 1e-4
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == state["clip.logit_scale"].item()
    # the towers: the upstream CLIP weights, through HF's own feature functions
    clip = CLIPModel(clip_config("tiny"))
    clip.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("clip.") and "position_ids" not in k})
    with torch.no_grad():
        ht = clip.get_text_features(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(t, getattr(ht, "pooler_output", ht))


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("pool_frames.layer_norm2.bias"), "missing pool_frames.layer_norm2.bias"),
    (lambda s: s.__setitem__("stochastic.extra_gate", torch.zeros(1)), "unexpected stochastic.extra_gate"),
    (lambda s: s.__setitem__("stochastic.std_branch.linear_proj.weight", torch.zeros(32, 12)),
     r"shape radius.linear_proj.weight: checkpoint \(32, 12\)"),
])
def test_upstream_checkpoint_key_errors(tmp_path, change, message):
    state = upstream_state()
    change(state)
    torch.save({"state_dict": state}, tmp_path / "c.pth")
    with pytest.raises(CheckpointMismatch, match=message):
        load_upstream(fresh(), str(tmp_path / "c.pth"))


def test_export_then_import_round_trip(tmp_path):
    model = fresh(support_loss_weight=0.8, stochastic_prior="normal", stochastic_prior_std=3e-3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_hf(model, str(tmp_path / "export"))
    back = load_hf(str(tmp_path / "export"))
    assert back.cfg == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = CLIPModel.from_pretrained(str(tmp_path / "export"))  # the CLIP part is a plain HF checkpoint
    assert plain.logit_scale.dim() == 0 and plain.logit_scale.item() == model.logit_scale.item()
    assert json.loads((tmp_path / "export" / "tmass_config.json").read_text())["stochastic_prior"] == "normal"
    ids, mask, video = inputs()
    eps = torch.rand(3, 32)
    model.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, video, eps)["loss"], back(ids, mask, video, eps)["loss"])


def test_local_clip_directory_and_hub_names(tmp_path):
    torch.manual_seed(0)
    CLIPModel(clip_config("tiny")).save_pretrained(tmp_path / "clip")
    clip = build_clip(str(tmp_path / "clip"))
    assert clip.logit_scale.shape == (1,) and clip.config.projection_dim == 32
    with pytest.raises(ConfigError, match="not in the HF cache .*huggingface-cli download"):
        build_clip("openai/clip-vit-base-patch32")
    with pytest.raises(ConfigError, match="is not a directory"):
        build_clip(str(tmp_path / "nowhere" / "clip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a loadable CLIP checkpoint"):
        build_clip(str(tmp_path / "empty"))


class _Payload:
    """Unpickling this runs os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_runs_code_is_refused_and_never_run(tmp_path):
    """A .pth whose pickle calls os.system is refused by load_upstream and by load_model (launch/eval.py's
    --checkpoint): the marker file that the payload would create never appears."""
    from tmass.checkpoint import load_model
    from tmass.model.io import UnsafeCheckpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 3, "state_dict": upstream_state(), "extra": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpoint, match="will not unpickle it"):
        load_upstream(fresh(), str(path))
    with pytest.raises(UnsafeCheckpoint):
        load_model(ModelConfig(clip_arch="tiny", num_frames=F), str(path))
    assert not marker.exists()
    torch.save({"epoch": 3, "state_dict": upstream_state()}, path)  # the same file without the payload loads
    assert load_upstream(fresh(), str(path)) == {"epoch": 3}
    path.write_bytes(path.read_bytes()[:1000])  # truncated: a clear error, not a traceback from the zip reader
    with pytest.raises(CheckpointMismatch, match="not a readable torch checkpoint"):
        load_upstream(fresh(), str(path))


def test_a_hub_name_resolves_offline_through_the_hf_cache(tmp_path, monkeypatch):
    """--clip_path org/name: the snapshot that a `huggingface-cli download` left in the cache (laid out here by
    hand: models--org--name/refs/main and snapshots/<commit>/), loaded without the network; the tokenizer too."""
    from tmass.data.tokenizer import resolve_tokenizer
    from tmass.model.clip import resolve_clip_path

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-clip"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    torch.manual_seed(1)
    CLIPModel(clip_config("tiny")).save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snap.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_clip_path("someone/tiny-clip") == str(snap)
    clip = build_clip("someone/tiny-clip")
    torch.testing.assert_close(clip.text_projection.weight,
                               CLIPModel.from_pretrained(snap).text_projection.weight)
    assert resolve_tokenizer(None, "someone/tiny-clip", None) == str(snap)
    with pytest.raises(ConfigError, match=f"someone/other: not in the HF cache {cache}"):
        resolve_clip_path("someone/other")


def test_clip_architectures_have_openais_parameter_counts():
    """--clip_arch's configs against the parameter counts of OpenAI's checkpoints as published on the HF hub
    (openai/clip-vit-base-patch32, -base-patch16, -large-patch14, -large-patch14-336), built on the meta device."""
    published = {"ViT-B/32": 151_277_313, "ViT-B/16": 149_620_737, "ViT-L/14": 427_616_513,
                 "ViT-L/14-336": 427_944_193}
    for arch, count in published.items():
        with torch.device("meta"):
            model = CLIPModel(clip_config(arch))
        assert sum(p.numel() for p in model.parameters()) == count, arch
    assert clip_config("ViT-L/14-336").vision_config.image_size == 336
