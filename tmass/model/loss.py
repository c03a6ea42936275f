"""The T-MASS training loss over a (possibly global) contrastive batch (docs/method.md).

With B pairs (t_j, v_j), the pooled video psi(v_i | t_j) and the stochastic text t_s[j] (radius from its own
video j), the similarity is s[j, i] = cos(t_s[j], psi(v_i | t_j)) and
    L(s)  = 1/2 [ mean_j -log softmax_i(tau s[j, :])_j + mean_i -log softmax_j(tau s[:, i])_i ],  tau = exp(logit_scale)
    L     = L(s with t_s) + lambda_sup * L(s with t_sup)
The logits and softmax run in fp32; logit_scale is clamped to <= ln 100.

Global batch: a rank holds b of the B pairs (global indices offset .. offset + b - 1). It scores its local
texts against all videos (rows of s) and its local videos against all texts (columns of s), so its pooled
tensors are [B, b, D] and [b, B, D], never [B, B, D]. The mean over ranks of the rank losses is L over the
global batch, and `gather` (an all-gather with gradients) carries every gradient home.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .pooling import TextConditionedPool
from .stochastic import paired_cosines, stochastic_text, support_text

MAX_LOGIT_SCALE = math.log(100.0)
Gather = Callable[[torch.Tensor], torch.Tensor]


def pair_cosines(text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """s[j, i] = cos(text_j, pooled[i, j]). [N_t, D], [N_v, N_t, D] -> [N_t, N_v] (fp32)."""
    return torch.einsum("td,vtd->tv", F.normalize(text.float(), dim=-1), F.normalize(pooled.float(), dim=-1))


def symmetric_infonce(
    s_rows: torch.Tensor,
    s_cols: torch.Tensor,
    offset: int,
    logit_scale: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """1/2 [CE(tau s_rows, offset + j) + CE(tau s_cols, offset + i)]; s_rows [b, B] local texts x all videos,
    s_cols [b, B] local videos x all texts (s_cols = s_rows^T on one process).
    With `positives` [b, B] (pairs of the same video), each row's target is the set of its positives:
        -log sum_{p in P} softmax(tau s)_p = logsumexp(tau s) - logsumexp_{P}(tau s)."""
    tau = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
    if positives is None:
        target = torch.arange(offset, offset + s_rows.shape[0], device=s_rows.device)
        return 0.5 * (F.cross_entropy(tau * s_rows, target) + F.cross_entropy(tau * s_cols, target))

    def multi(s: torch.Tensor) -> torch.Tensor:
        logits = tau * s
        return (logits.logsumexp(-1) - logits.masked_fill(~positives, float("-inf")).logsumexp(-1)).mean()

    return 0.5 * (multi(s_rows) + multi(s_cols))


def pooled_both_ways(
    pool: TextConditionedPool,
    t_all: torch.Tensor,
    f_all: torch.Tensor,
    rows: slice,
    single: bool,
    dropout_stream: tuple | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """psi(v_i | t_j) for the local texts against all videos [B, b, D], and for the local videos against all
    texts [b, B, D] (the same tensor on one process). Each half of the pooling runs once per pair; the dropout
    masks are keyed by the pairs' global (video, text) ids."""
    q_all, side_all = pool.text_side(t_all), pool.video_side(f_all)
    key_rows = key_cols = None
    if dropout_stream is not None:
        every = torch.arange(t_all.shape[0], device=t_all.device)
        local = every[rows]
        key_rows, key_cols = (dropout_stream, every, local), (dropout_stream, local, every)
    v_rows = pool.pool(q_all[rows], side_all, dropout_key=key_rows)
    v_cols = v_rows if single else pool.pool(q_all, side_all[rows], dropout_key=key_cols)
    return v_rows, v_cols


def support_center_of(v_cols: torch.Tensor, offset: int, mode: str) -> torch.Tensor:
    """The support text's centre for each local video i, from v_cols [b, B, D] -> [b, D]: "upstream" averages
    video i pooled with every text of the batch, "paper" takes video i pooled with its own text."""
    if mode == "upstream":
        return v_cols.mean(dim=1)
    b = v_cols.shape[0]
    return v_cols[torch.arange(b), torch.arange(offset, offset + b)]


@torch.no_grad()
def own_video_cosine(t_loc: torch.Tensor, v_rows: torch.Tensor, offset: int) -> torch.Tensor:
    """mean_j cos(t_j, psi(v_j | t_j)) over the local pairs, the similarity that the radius follows (logged
    beside it). t_loc [b, D], v_rows [B, b, D] -> a scalar."""
    b = t_loc.shape[0]
    own = v_rows[torch.arange(offset, offset + b, device=v_rows.device), torch.arange(b, device=v_rows.device)]
    return F.cosine_similarity(t_loc.float(), own.float(), dim=-1).mean()


def tmass_loss(
    pool: TextConditionedPool,
    radius: Callable,
    logit_scale: torch.Tensor,
    t_loc: torch.Tensor,
    f_loc: torch.Tensor,
    eps_all: torch.Tensor,
    *,
    offset: int = 0,
    gather: Gather | None = None,
    support_weight: float = 0.0,
    support_center: str = "upstream",
    video_ids: torch.Tensor | None = None,
    dropout_stream: tuple | None = None,
) -> dict[str, torch.Tensor]:
    """The loss of one rank. t_loc [b, D] and f_loc [b, F, D] are its pairs; eps_all [B, D] is the noise of
    every pair of the global batch (the same on every rank). Without `gather`, b = B (one process).
    video_ids [B] (the global batch's video of each pair) turns on multi-positive InfoNCE: pairs of the same
    video count as positives (MSR-VTT has 20 captions per video). dropout_stream (e.g. (seed, "dropout", step,
    micro)) keys the pooling's dropout mask of each pair by its global ids: both directions of the loss, and
    every world size, see the same mask for a pair, as upstream's single process does."""
    single = gather is None
    t_all = t_loc if single else gather(t_loc)  # [B, D]
    f_all = f_loc if single else gather(f_loc)  # [B, F, D]
    rows = slice(offset, offset + t_loc.shape[0])  # the local pairs' global ids
    r_all = radius(paired_cosines(t_all, f_all))  # [B, D], each text's radius from its own video
    v_rows, v_cols = pooled_both_ways(pool, t_all, f_all, rows, single, dropout_stream)

    positives = None if video_ids is None else video_ids[rows, None] == video_ids[None, :]  # [b, B], symmetric

    def loss_for(text_all: torch.Tensor) -> torch.Tensor:
        s_rows = pair_cosines(text_all[rows], v_rows)  # [b, B]
        s_cols = s_rows.T if single else pair_cosines(text_all, v_cols).T  # [b, B]
        return symmetric_infonce(s_rows, s_cols, offset, logit_scale, positives)

    loss_s = loss_for(stochastic_text(t_all, r_all, eps_all))
    out = {
        "loss_stochastic": loss_s.detach(),
        "radius_l1": r_all[rows].sum(-1).mean().detach(),
        "pos_cosine": own_video_cosine(t_all[rows], v_rows, offset),
        "logit_scale": logit_scale.detach().reshape(()),
    }
    if support_weight > 0:
        center_loc = support_center_of(v_cols, offset, support_center)
        center_all = center_loc if single else gather(center_loc)
        loss_sup = loss_for(support_text(t_all, r_all, center_all))
        out["loss_support"] = loss_sup.detach()
        out["loss"] = loss_s + support_weight * loss_sup
    else:
        out["loss"] = loss_s
    return out
