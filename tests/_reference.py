"""Naive float64 references for the T-MASS math, written from docs/method.md with plain loops and
explicit weight tensors (a state dict), independent of tmass's modules."""
from __future__ import annotations

import math

import torch


def ln(x, w, b, eps=1e-5):
    mu = x.mean()
    var = ((x - mu) ** 2).mean()
    return (x - mu) / torch.sqrt(var + eps) * w + b


def lin(x, sd, name):
    return sd[f"{name}.weight"] @ x + sd[f"{name}.bias"]


def pool_one(t, frames, sd, p="pool_frames.", mask=None):
    """psi(v | t) for one text t [D] and one video's frames [F, D], from the upstream-named weights; `mask`: the
    dropout's (already scaled) multiplier on W_l h + b_l in training."""
    g = lambda k: sd[p + k]  # noqa: E731
    tq = ln(t, g("layer_norm1.weight"), g("layer_norm1.bias"))
    q = lin(tq, sd, p + "cross_attn.q_proj")
    logits, vals = [], []
    for f in frames:
        fn = ln(f, g("layer_norm1.weight"), g("layer_norm1.bias"))
        logits.append(lin(fn, sd, p + "cross_attn.k_proj") @ q / math.sqrt(len(t)))
        vals.append(lin(fn, sd, p + "cross_attn.v_proj"))
    m = max(float(x.detach()) for x in logits)  # a constant shift: the softmax does not change
    w = [torch.exp(x - m) for x in logits]
    attn = sum(wi / sum(w) * v for wi, v in zip(w, vals))
    h = ln(lin(attn, sd, p + "cross_attn.out_proj"), g("layer_norm2.weight"), g("layer_norm2.bias"))
    lin_h = lin(h, sd, p + "linear_proj")
    return ln(h + (lin_h if mask is None else mask * lin_h), g("layer_norm3.weight"), g("layer_norm3.bias"))


def cos(a, b):
    return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))


def radius_one(t, frames, W, bias):
    """R = exp(W S + b), S_k = cos(t, f_k)."""
    s = torch.tensor([cos(t, f) for f in frames], dtype=torch.float64)
    return torch.exp(W @ s + bias)


def infonce(s, tau):
    """1/2 [mean_j -log softmax_i(tau s[j])_j + mean_i -log softmax_j(tau s[:, i])_i] with loops."""
    n = len(s)
    rows = -sum(tau * s[j][j] - math.log(sum(math.exp(tau * s[j][i]) for i in range(n))) for j in range(n)) / n
    cols = -sum(tau * s[i][i] - math.log(sum(math.exp(tau * s[j][i]) for j in range(n))) for i in range(n)) / n
    return 0.5 * (rows + cols)


def tmass_loss(t, f, eps, sd, tau, support_weight=0.0, center="upstream", radius_prefix="radius.linear_proj."):
    """The whole training loss for B pairs (t [B, D], f [B, F, D]) by loops."""
    B = len(t)
    W, bias = sd[radius_prefix + "weight"], sd[radius_prefix + "bias"]
    v = [[pool_one(t[j], f[i], sd) for j in range(B)] for i in range(B)]  # v[i][j] = psi(v_i | t_j)
    R = [radius_one(t[j], f[j], W, bias) for j in range(B)]
    ts = [t[j] + R[j] * eps[j] for j in range(B)]
    s = [[cos(ts[j], v[i][j]) for i in range(B)] for j in range(B)]
    loss = infonce(s, tau)
    if support_weight:
        vbar = [sum(v[j][k] for k in range(B)) / B if center == "upstream" else v[j][j] for j in range(B)]
        tsup = []
        for j in range(B):
            d = vbar[j] - t[j]
            tsup.append(t[j] + R[j] * d / math.sqrt(float(d @ d)))
        s2 = [[cos(tsup[j], v[i][j]) for i in range(B)] for j in range(B)]
        loss = loss + support_weight * infonce(s2, tau)
    return loss


def eval_score(t, frames, sd, eps_list, radius_prefix="radius.linear_proj."):
    """max_m cos(t + R(t, v) * eps_m, psi(v | t)) for one text and one video, by loops."""
    W, bias = sd[radius_prefix + "weight"], sd[radius_prefix + "bias"]
    p = pool_one(t, frames, sd)
    R = radius_one(t, frames, W, bias)
    return max(cos(t + R * e, p) for e in eps_list)


def ranks_by_hand(scores, right):
    """For each row, how many entries beat the right one strictly."""
    return [sum(1 for v in row if v > row[r]) for row, r in zip(scores, right)]


def multi_positive_infonce(s, tau, vids):
    """Both directions; each query's targets are all the candidates of its own video."""
    n = len(s)
    def one(q_scores, q):
        z = [tau * v for v in q_scores]
        m = max(z)
        all_ = m + math.log(sum(math.exp(x - m) for x in z))
        pos = [z[k] for k in range(n) if vids[k] == vids[q]]
        mp = max(pos)
        return all_ - (mp + math.log(sum(math.exp(x - mp) for x in pos)))
    rows = sum(one([s[j][i] for i in range(n)], j) for j in range(n)) / n
    cols = sum(one([s[j][i] for j in range(n)], i) for i in range(n)) / n
    return 0.5 * (rows + cols)
