"""Retrieval metrics from ranks, and the ranks themselves from a block of scores.

rank = the number of candidates scored strictly higher than the right one (0 = first; ties count in the
query's favour, as CLIP4Clip's metric). R@K = 100 * mean(rank < K); MdR = median(rank) + 1, the median as
np.median takes it (the mean of the two middle ranks for an even number of queries, as upstream);
MnR = mean(rank) + 1.

t2v: one query per text; the right video is the text's own.
v2t: one query per video; a candidate video k scores max over k's captions of s[caption, query video], and the
     right candidate is the query itself (upstream's v2t with several captions per video).
"""

from __future__ import annotations

import numpy as np
import torch

KS = (1, 5, 10, 50)


def metrics_from_ranks(ranks: torch.Tensor) -> dict[str, float]:
    r = ranks.double()
    out = {f"R@{k}": round(100.0 * (r < k).double().mean().item(), 4) for k in KS}
    out["MdR"] = float(np.median(r.cpu().numpy())) + 1 if r.numel() else float("nan")
    out["MnR"] = round(r.mean().item() + 1, 4)
    out["n"] = int(r.numel())
    return out


def t2v_ranks(scores: torch.Tensor, right_video: torch.Tensor) -> torch.Tensor:
    """scores [n_t, N_v], right_video [n_t] -> ranks [n_t]."""
    right = scores.gather(1, right_video.view(-1, 1))
    return (scores > right).sum(dim=1)


def best_caption_scores(scores: torch.Tensor, text_video: torch.Tensor, videos: torch.Tensor) -> torch.Tensor:
    """S'[k, i] = max over the captions j of video k of scores[j, i]: [len(videos), N_v] for the owner videos
    `videos` (every caption of each must be among the rows)."""
    out = torch.full((len(videos), scores.shape[1]), float("-inf"), dtype=scores.dtype, device=scores.device)
    slot = torch.searchsorted(videos, text_video)
    return out.scatter_reduce_(0, slot[:, None].expand_as(scores), scores, "amax", include_self=True)
