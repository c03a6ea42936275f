"""The model and the loss against naive float64 loops (tests/_reference.py), on N_t != N_v."""
import math

import pytest
import torch

import _reference as ref
from tmass.config import ModelConfig, parse_config
from tmass.engine import make_adamw, param_groups
from tmass.errors import TmassError
from tmass.model.loss import tmass_loss
from tmass.model.clip import clip_config, frame_features, text_features
from tmass.model.pooling import TextConditionedPool
from tmass.model.noise import counter_noise, keyed_noise, mix32, noise_table, row_keys, salt, words
from tmass.model.stochastic import SimilarityRadius, all_cosines, paired_cosines, stochastic_text, support_text
from tmass.model.tmass import TMASS

D, F = 8, 4


def perturbed(module, seed=0, scale=0.3):
    """Move every parameter off its init, so that identity weights cannot hide a mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_pooling_against_a_loop_for_unequal_texts_and_videos():
    pool = perturbed(TextConditionedPool(D, dropout=0.0)).double()
    t, f = rand(3, D, seed=1), rand(5, F, D, seed=2)
    out = pool(t, f)
    assert out.shape == (5, 3, D)
    sd = {f"pool_frames.{k}": v for k, v in pool.state_dict().items()}
    for i in range(5):
        for j in range(3):
            torch.testing.assert_close(out[i, j], ref.pool_one(t[j], f[i], sd), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pool(t[1:], f[2:4]), out[2:4, 1:])  # a chunk of texts x a chunk of videos
    q = pool.text_side(t)
    torch.testing.assert_close(pool.pool(q, pool.video_side(f, block=2)), out)  # the videos made 2 at a time
    unit = pool.pool(q, pool.video_side(f), text_major=True, unit=True)  # |psi| through the coefficients
    torch.testing.assert_close(unit, out.transpose(0, 1) / out.norm(dim=-1).T[..., None], rtol=1e-10, atol=1e-10)


class FixedMask(torch.nn.Module):
    """Dropout with a known mask, so that the training branch can be checked against the loop."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def test_pooling_in_training_against_a_loop_values_and_gradients():
    """The training branch (two sums, dropout between them) with a fixed dropout mask: values and the gradients
    of every pooling weight and of the inputs, against autograd through the float64 loop."""
    t, f = rand(3, D, seed=1).requires_grad_(), rand(5, F, D, seed=2).requires_grad_()
    mask = (torch.rand(5, 3, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64) > 0.3) / 0.7
    w = rand(5, 3, D, seed=5)
    pool = perturbed(TextConditionedPool(D, dropout=0.3)).double().train()
    pool.dropout = FixedMask(mask)
    out = pool(t, f)
    (out * w).sum().backward()
    sd = {f"pool_frames.{k}": v.detach().clone().requires_grad_() for k, v in pool.state_dict().items()}
    t2, f2 = t.detach().clone().requires_grad_(), f.detach().clone().requires_grad_()
    ref_out = torch.stack([torch.stack([ref.pool_one(t2[j], f2[i], sd, mask=mask[i, j]) for j in range(3)])
                           for i in range(5)])
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    (ref_out * w).sum().backward()
    for name, p in pool.named_parameters():
        torch.testing.assert_close(p.grad, sd[f"pool_frames.{name}"].grad, rtol=1e-8, atol=1e-10, msg=name)
    torch.testing.assert_close(t.grad, t2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(f.grad, f2.grad, rtol=1e-8, atol=1e-10)


def test_keyed_dropout_mask_per_pair_against_the_loop():
    """dropout_key: pair (i, j)'s mask is a function of its global ids and the stream alone. The pooled values
    equal the float64 loop with that mask; a block of pairs pooled alone (as another rank pools it) gets the
    same values; about 1 - p of the mask is kept; another step's stream gives another mask."""
    from tmass.model.noise import pair_dropout_mask

    pool = perturbed(TextConditionedPool(D, dropout=0.3)).double().train()
    t, f = rand(3, D, seed=1), rand(5, F, D, seed=2)
    stream = (24, "dropout", 7, 0)
    vids, tids = torch.arange(10, 15), torch.arange(3)
    out = pool.pool(pool.text_side(t), pool.video_side(f), dropout_key=(stream, vids, tids))
    mask = pair_dropout_mask(stream, vids, tids, D, 0.3, torch.float64)
    sd = {f"pool_frames.{k}": v for k, v in pool.state_dict().items()}
    for i in range(5):
        for j in range(3):
            torch.testing.assert_close(out[i, j], ref.pool_one(t[j], f[i], sd, mask=mask[i, j]), rtol=1e-10,
                                       atol=1e-10)
    part = pool.pool(pool.text_side(t[1:]), pool.video_side(f[3:]), dropout_key=(stream, vids[3:], tids[1:]))
    torch.testing.assert_close(part, out[3:, 1:], rtol=1e-12, atol=1e-12)
    big = pair_dropout_mask(stream, torch.arange(64), torch.arange(64), 512, 0.3)
    assert torch.equal(big.unique(), torch.tensor([0.0, 1 / 0.7]))
    assert abs((big > 0).float().mean().item() - 0.7) < 0.005
    assert not torch.equal(big, pair_dropout_mask((24, "dropout", 8, 0), torch.arange(64), torch.arange(64), 512,
                                                  0.3))


def test_pooling_init_is_identity_projections():
    pool = TextConditionedPool(D, dropout=0.3)
    for name, p in pool.named_parameters():
        if "proj" in name:
            expected = torch.eye(D) if p.dim() == 2 else torch.zeros(D)
            assert torch.equal(p.detach(), expected), name


def test_radius_against_a_loop_paired_and_all_pairs():
    rad = perturbed(SimilarityRadius(F, D)).double()
    t, f = rand(3, D, seed=3), rand(5, F, D, seed=4)
    W, b = rad.linear_proj.weight.detach(), rad.linear_proj.bias.detach()
    r_all = rad(all_cosines(t, f))  # [3, 5, D]
    for j in range(3):
        for i in range(5):
            torch.testing.assert_close(r_all[j, i].double(), ref.radius_one(t[j], f[i], W, b), rtol=1e-6, atol=1e-6)
    r_pair = rad(paired_cosines(t, f[:3]))
    for n in range(3):
        torch.testing.assert_close(r_pair[n].double(), ref.radius_one(t[n], f[n], W, b), rtol=1e-6, atol=1e-6)
    assert r_pair.dtype == torch.float32


def test_radius_init_is_exp_of_similarities_then_ones():
    rad = SimilarityRadius(F, D)
    t, f = rand(2, D).float(), rand(2, F, D).float()
    s = torch.tensor([[ref.cos(t[n].double(), f[n, k].double()) for k in range(F)] for n in range(2)])
    r = rad(paired_cosines(t, f))
    torch.testing.assert_close(r[:, :F], s.exp().float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(r[:, F:], torch.ones(2, D - F))


def test_stochastic_and_support_text_against_loops():
    t, r, eps, c = rand(4, D, seed=5), rand(4, D, seed=6).abs(), rand(4, D, seed=7), rand(4, D, seed=8)
    ts, tsup = stochastic_text(t, r.float(), eps), support_text(t, r.float(), c)
    for n in range(4):
        torch.testing.assert_close(ts[n].double(), t[n] + r[n] * eps[n], rtol=1e-5, atol=1e-5)
        d = c[n] - t[n]
        torch.testing.assert_close(tsup[n].double(), t[n] + r[n] * d / d.norm(), rtol=1e-5, atol=1e-5)
    one = support_text(t[:1], r[:1].float(), c[:1])  # batch size 1 (upstream's squeeze broke here)
    assert one.shape == (1, D) and torch.isfinite(one).all()


def test_noise_priors_and_keys():
    for prior in ("uniform01", "normal"):
        block = keyed_noise((24, "text"), torch.arange(6), 3, D, prior, 1.0)  # rows 0..5 at once
        one_by_one = torch.cat([keyed_noise((24, "text"), [r], 3, D, prior, 1.0) for r in range(6)])
        assert torch.equal(block, one_by_one) and not torch.equal(block[0], block[1])
        assert not torch.equal(block[0, 0], block[0, 1])  # trials differ
        assert torch.equal(keyed_noise((24, "text"), [4, 3], 3, D, prior, 1.0), block[[4, 3]])
        assert not torch.equal(keyed_noise((25, "text"), [0], 3, D, prior, 1.0), block[:1])
    big = keyed_noise((1,), torch.arange(400), 10, 5, "normal", 2.0)
    assert abs(big.std() - 2.0) < 0.05 and abs(big.mean()) < 0.05
    u = keyed_noise((1,), torch.arange(400), 10, 5, "uniform01", 1.0)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02  # not zero-mean, as upstream
    with pytest.raises(ValueError, match="unknown stochastic prior 'gauss'"):
        keyed_noise((1,), [0], 1, 5, "gauss", 1.0)


def _lowbias32(x: int) -> int:
    """Wellons' lowbias32 on Python integers, written from its published definition."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    return x ^ (x >> 16)


def test_counter_noise_against_python_integers():
    """Each draw, recomputed with Python's unbounded integers from the definition in stochastic.py."""
    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 123_456_789]
    assert [_lowbias32(x) for x in xs] == (mix32(words(torch.tensor(xs))).long() & 0xFFFFFFFF).tolist()
    s, M, dim = salt((24, "pair")), 3, 7
    keys = row_keys((24, "pair"), torch.tensor([5, 0, 4_000_000_000]), torch.tensor([2, 9, 123_456]))
    eps = counter_noise(keys, noise_table((24, "pair"), M, dim), "uniform01", 1.0)
    normal = counter_noise(keys, noise_table((24, "pair"), M, dim), "normal", 0.5)
    for n, (j, i) in enumerate([(5, 2), (0, 9), (4_000_000_000, 123_456)]):
        key = _lowbias32((j + s) % 2**32)
        key = _lowbias32((key + _lowbias32((i + s + 0x9E3779B9) % 2**32)) % 2**32)
        assert keys[n].item() & 0xFFFFFFFF == key
        for m in range(M):
            for d in range(dim):
                c = m * dim + d
                u1 = (_lowbias32((key + _lowbias32((c + s) % 2**32)) % 2**32) >> 8) / 2**24
                u2 = (_lowbias32((key + _lowbias32((c + (s ^ 0x5BD1E995)) % 2**32)) % 2**32) >> 8) / 2**24
                assert eps[n, m, d].item() == u1
                z = 0.5 * math.sqrt(-2 * math.log(1 - u1)) * math.cos(2 * math.pi * u2)
                assert abs(normal[n, m, d].item() - z) < 1e-5


def test_counter_noise_is_uniform_and_uncorrelated():
    """Moments, a chi-square over 64 bins, and correlations along the counter and between neighbouring rows and
    pairs (a weak hash shows up here: the identity map fails every line)."""
    M, dim, n = 8, 256, 64
    j, i = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    u = counter_noise(row_keys((7, "pair"), j, i), noise_table((7, "pair"), M, dim), "uniform01", 1.0).double()
    flat = u.flatten()  # 8.4 M draws
    assert abs(flat.mean() - 0.5) < 5 * (1 / 12 / flat.numel()) ** 0.5 and abs(flat.var() - 1 / 12) < 1e-3
    counts = torch.bincount((flat * 64).long(), minlength=64).double()
    chi2 = ((counts - flat.numel() / 64) ** 2 / (flat.numel() / 64)).sum().item()
    assert chi2 < 63 + 6 * (2 * 63) ** 0.5  # 63 degrees of freedom, 6 sigma

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return ((a * b).mean() / (a.std() * b.std())).item()
    limit = 6 / (u[:, :, :, 1:].numel() ** 0.5)
    assert abs(corr(u[..., 1:], u[..., :-1])) < limit  # next dim
    assert abs(corr(u[:, :, 1:], u[:, :, :-1])) < 6 / u[:, :, 1:].numel() ** 0.5  # next trial
    assert abs(corr(u[:, 1:], u[:, :-1])) < 6 / u[:, 1:].numel() ** 0.5  # next video, same text
    assert abs(corr(u[1:], u[:-1])) < 6 / u[1:].numel() ** 0.5  # next text, same video
    assert abs(corr(u, u.transpose(0, 1))) < 6 / u.numel() ** 0.5 + 1 / n  # (j, i) against (i, j)
    assert not torch.equal(u[1, 2], u[2, 1])


def _head(seed=0):
    pool = perturbed(TextConditionedPool(D, 0.0), seed).double()
    rad = perturbed(SimilarityRadius(F, D), seed + 1, scale=0.1).double()
    sd = {f"pool_frames.{k}": v for k, v in pool.state_dict().items()}
    sd |= {f"radius.{k}": v.double() for k, v in rad.state_dict().items()}
    return pool, rad, sd


@pytest.mark.parametrize("weight, center", [(0.0, "upstream"), (0.8, "upstream"), (0.5, "paper")])
def test_loss_against_a_loop(weight, center):
    pool, rad, sd = _head()
    B = 5
    t, f, eps = rand(B, D, seed=9), rand(B, F, D, seed=10), rand(B, D, seed=11).abs()
    scale = torch.tensor([math.log(20.0)], dtype=torch.float64)
    out = tmass_loss(pool, rad, scale, t, f, eps, support_weight=weight, support_center=center)
    expected = ref.tmass_loss(t, f, eps, sd, 20.0, weight, center)
    assert abs(out["loss"].item() - expected) < 1e-4 * max(1.0, abs(expected))
    own = sum(ref.cos(t[j], ref.pool_one(t[j], f[j], sd)) for j in range(B)) / B  # the logged similarity
    assert abs(out["pos_cosine"].item() - float(own)) < 1e-6


def test_logit_scale_is_clamped_at_ln_100():
    pool, rad, sd = _head()
    t, f, eps = rand(3, D, seed=9), rand(3, F, D, seed=10), rand(3, D, seed=11)
    high = tmass_loss(pool, rad, torch.tensor([10.0]), t, f, eps)["loss"].item()
    assert abs(high - ref.tmass_loss(t, f, eps, sd, 100.0)) < 1e-3


def test_rank_split_with_a_fake_gather_equals_the_whole_batch():
    """Two 'ranks' of 3 pairs: the mean of their losses is the loss of the 6 pairs, support term included.
    The fake gather puts the other rank's share (computed here from the inputs) beside ours, in rank order."""
    pool, rad, _ = _head(seed=3)
    t, f, eps = rand(6, D, seed=12), rand(6, F, D, seed=13), rand(6, D, seed=14)
    scale = torch.tensor([math.log(30.0)], dtype=torch.float64)
    whole = tmass_loss(pool, rad, scale, t, f, eps, support_weight=0.8)["loss"]
    parts = []
    for r in range(2):
        mine, theirs = slice(3 * r, 3 * r + 3), slice(3 - 3 * r, 6 - 3 * r)
        shares = iter([t[theirs], f[theirs], pool(t, f[theirs]).mean(dim=1)])  # in tmass_loss's call order

        def gather(x, r=r, shares=shares):
            other = next(shares)
            assert other.shape == x.shape
            return torch.cat([x, other] if r == 0 else [other, x])

        parts.append(tmass_loss(pool, rad, scale, t[mine], f[mine], eps, offset=3 * r, gather=gather,
                                support_weight=0.8)["loss"])
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole, rtol=1e-6, atol=1e-6)


def tiny_model(**kw):
    torch.manual_seed(0)
    return TMASS(ModelConfig(clip_arch="tiny", num_frames=F, transformer_dropout=0.0, **kw))


def batch(B=3, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49000, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 49406, 49407
    return ids, torch.ones(B, L, dtype=torch.long), torch.randn(B, F, 3, 32, 32, generator=g)


def test_features_are_the_projected_eos_and_cls_states():
    m = tiny_model()
    ids, mask, video = batch()
    with torch.no_grad():
        ref_t = m.clip.get_text_features(input_ids=ids, attention_mask=mask)
        ref_t = getattr(ref_t, "pooler_output", ref_t)
        ref_f = m.clip.get_image_features(pixel_values=video.flatten(0, 1))
        ref_f = getattr(ref_f, "pooler_output", ref_f).view(3, F, -1)
        torch.testing.assert_close(text_features(m.clip, ids, mask), ref_t)
        torch.testing.assert_close(frame_features(m.clip, video), ref_f)


def test_gradients_reach_every_parameter():
    m = tiny_model(support_loss_weight=0.8)
    ids, mask, video = batch()
    eps = torch.rand(3, m.dim, generator=torch.Generator().manual_seed(1))
    m(ids, mask, video, eps)["loss"].backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
    assert m.logit_scale.shape == (1,)  # 1-element for DeepSpeed's broadcast (DeepSpeed cannot broadcast a 0-dim one)


def test_support_loss_at_batch_size_one():
    m = tiny_model(support_loss_weight=0.8)
    ids, mask, video = batch(B=1)
    out = m(ids, mask, video, torch.rand(1, m.dim))
    assert torch.isfinite(out["loss"]) and "loss_support" in out


def test_bf16_autocast_stays_close_to_fp32():
    m = tiny_model(support_loss_weight=0.8)
    ids, mask, video = batch(B=4)
    eps = torch.rand(4, m.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids, mask, video, eps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = m(ids, mask, video, eps)
            t = m.encode_text(ids, mask)
    assert t.dtype == torch.bfloat16  # the towers really ran in bf16
    for k in ("loss", "loss_stochastic", "loss_support", "radius_l1"):
        assert torch.isfinite(half[k]) and half[k].dtype == torch.float32
        assert abs(half[k] - full[k]) <= 1e-2 * abs(full[k]), (k, half[k], full[k])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    ids, mask, video = batch()
    eps = torch.rand(3, 32, generator=torch.Generator().manual_seed(3))
    grads = []
    for ckpt in (False, True):
        m = tiny_model(grad_checkpointing=ckpt)
        m.train()
        calls = []
        for layer in (m.clip.text_model.encoder.layers[0], m.clip.vision_model.encoder.layers[0]):
            layer.mlp.fc1.register_forward_hook(lambda *a: calls.append(1))  # inside the checkpointed forward
        out = m(ids, mask, video, eps)
        out["loss"].backward()
        assert len(calls) == (4 if ckpt else 2)  # recomputed in backward only with checkpointing
        grads.append((out["loss"].item(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-5, atol=1e-7)


def test_compiled_layers_match_eager_with_checkpointing():
    """--compile (torch.compile per encoder layer) keeps the parameter names and gives the eager loss and gradients,
    also under activation checkpointing; the layers really run compiled."""
    ids, mask, video = batch()
    eps = torch.rand(3, 32, generator=torch.Generator().manual_seed(3))
    eager = tiny_model()
    compiled = tiny_model(grad_checkpointing=True, compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    assert all(layer._compiled_call_impl is not None for layer in compiled.clip.vision_model.encoder.layers)
    results = []
    for m in (eager, compiled):
        m.train()
        out = m(ids, mask, video, eps)
        out["loss"].backward()
        results.append((out["loss"].item(), {n: p.grad for n, p in m.named_parameters()}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=1e-4, atol=1e-6)


def loss_and_grads(m, ids, mask, video, eps):
    m.train()
    m.zero_grad()
    out = m(ids, mask, video, eps)
    out["loss"].backward()
    return out["loss"].item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, rel: float = 1e-5) -> None:
    """Each gradient within rel of its own largest entry (fp32 sums taken in another order differ so), or 1e-7
    for the keys' biases, whose gradient is 0 in exact arithmetic (softmax ignores a shift) and here ~1e-8 of
    rounding."""
    assert got.keys() == want.keys()
    for n, g in want.items():
        err, scale = (got[n] - g).abs().max().item(), g.abs().max().item()
        assert err <= rel * scale + 1e-7, f"{n}: max |difference| {err:.2e}, largest entry {scale:.2e}"


def test_whole_tower_compile_matches_eager():
    """--compile --compile_scope towers: each tower one compiled graph, the eager loss and gradients."""
    ids, mask, video = batch()
    eps = torch.rand(3, 32, generator=torch.Generator().manual_seed(3))
    eager, compiled = tiny_model(), tiny_model(compile=True, compile_scope="towers")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    assert compiled.clip.vision_model._compiled_call_impl is not None
    assert compiled.clip.text_model._compiled_call_impl is not None
    want, got = loss_and_grads(eager, ids, mask, video, eps), loss_and_grads(compiled, ids, mask, video, eps)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert_grads_close(got[1], want[1])


def test_sdpa_attention_matches_eager_with_padded_texts(monkeypatch):
    """--attn_implementation sdpa (the default) and eager: the same loss and gradients (fp32, padded captions);
    sdpa really calls torch's scaled_dot_product_attention and eager never does."""
    ids, mask, video = batch(B=4)
    ids[1, 5], mask[1, 6:] = 49407, 0  # a short caption: EOS, then padding
    ids[2, 3], mask[2, 4:] = 49407, 0
    eps = torch.rand(4, 32, generator=torch.Generator().manual_seed(4))
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    spy = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    results = {}
    for impl in ("eager", "sdpa"):
        calls.clear()
        m = tiny_model(attn_implementation=impl)
        assert m.clip.vision_model.config._attn_implementation == impl
        results[impl] = loss_and_grads(m, ids, mask, video, eps)
        assert bool(calls) == (impl == "sdpa"), impl
    assert results["sdpa"][0] == pytest.approx(results["eager"][0], rel=1e-6)
    assert_grads_close(results["sdpa"][1], results["eager"][1])
    with pytest.raises(TmassError, match="--attn_implementation flash_attention_2 cannot run here .*sdpa"):
        tiny_model(attn_implementation="flash_attention_2")  # flash-attn is not installed here


@pytest.mark.parametrize("choice", ["fused", "foreach"])
def test_fused_and_foreach_adamw_match_the_default_kernel(choice):
    """--adamw fused / foreach against torch's default AdamW, given the same gradients (the T-MASS loss's, both
    learning-rate groups, fp32): the same weights after 3 steps to 1e-6; auto picks fused where CUDA is."""
    ids, mask, video = batch()
    eps = torch.rand(3, 32, generator=torch.Generator().manual_seed(5))
    models, opts = [], []
    for adamw in ("auto", choice):
        cfg = parse_config(["--clip_arch", "tiny", "--num_frames", str(F), "--adamw", adamw, "--clip_lr", "1e-3"])
        models.append(tiny_model())
        opts.append(make_adamw(param_groups(models[-1], cfg), cfg, cuda=False))
        assert bool(opts[-1].defaults.get(choice)) == (adamw == choice)
    for _ in range(3):  # the default kernel's model makes the gradients; both optimisers step on them
        loss_and_grads(models[0], ids, mask, video, eps)
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        for opt in opts:
            opt.step()
    start = tiny_model().state_dict()
    want, got = models[0].state_dict(), models[1].state_dict()
    assert any(not torch.equal(start[n], w) for n, w in want.items())  # the steps moved the weights
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=0, atol=1e-6, msg=n)
    auto = parse_config(["--clip_arch", "tiny"])
    assert make_adamw(param_groups(tiny_model(), auto), auto, cuda=True).defaults["fused"] is True


def test_model_configs_and_wrong_flags():
    assert clip_config("ViT-B/16").vision_config.patch_size == 16
    assert clip_config("ViT-B/32").vision_config.patch_size == 32
    with pytest.raises(ValueError, match="--clip_arch"):
        ModelConfig(clip_arch="ViT-H/14")
    with pytest.raises(ValueError, match="--stochastic_prior"):
        ModelConfig(stochastic_prior="gauss")
    m = tiny_model()
    with pytest.raises(ValueError, match="--num_frames"):
        m.encode_frames(torch.zeros(1, F + 1, 3, 32, 32))


def test_multi_positive_loss_against_a_loop_and_unique_ids():
    pool, rad, sd = _head()
    B = 6
    t, f, eps = rand(B, D, seed=21), rand(B, F, D, seed=22), rand(B, D, seed=23).abs()
    scale = torch.tensor([math.log(20.0)], dtype=torch.float64)
    vids = torch.tensor([7, 3, 7, 5, 3, 9])
    out = tmass_loss(pool, rad, scale, t, f, eps, video_ids=vids)["loss"].item()
    W, bias = sd["radius.linear_proj.weight"], sd["radius.linear_proj.bias"]
    v = [[ref.pool_one(t[j], f[i], sd) for j in range(B)] for i in range(B)]
    ts = [t[j] + ref.radius_one(t[j], f[j], W, bias) * eps[j] for j in range(B)]
    s = [[ref.cos(ts[j], v[i][j]) for i in range(B)] for j in range(B)]
    assert abs(out - ref.multi_positive_infonce(s, 20.0, vids.tolist())) < 1e-6
    unique = tmass_loss(pool, rad, scale, t, f, eps, video_ids=torch.arange(B))["loss"].item()
    assert abs(unique - tmass_loss(pool, rad, scale, t, f, eps)["loss"].item()) < 1e-9
