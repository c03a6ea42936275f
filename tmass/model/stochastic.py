"""The text mass: similarity-aware radius, stochastic text and support text (docs/method.md).

All of it runs in fp32, whatever precision the towers use: exp() of a bf16 radius loses too much.

    S[.., k]  = cos(t, f_k)                         [..., F]   (one text against one video's frames)
    R         = exp(S W^T + b)                       [..., D]   W [D, F] starts as the identity, b = 0,
                                                                so R = e^S on the first F dims, 1 elsewhere
    t_s       = t + R * eps,  eps ~ U[0, 1) or N(0, std^2)      (the stochastic text)
    t_sup     = t + R * (v_bar - t) / ||v_bar - t||             (the support text, on the mass's surface)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def paired_cosines(text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """S[n, k] = cos(t_n, f_{n,k}): text n with the frames of video n. [N, D], [N, F, D] -> [N, F]."""
    return torch.einsum("nd,nfd->nf", _unit(text), _unit(frames))


def all_cosines(text: torch.Tensor, frames: torch.Tensor, inv_frame_norms: torch.Tensor | None = None) -> torch.Tensor:
    """S[j, i, k] = cos(t_j, f_{i,k}) = (t_j / |t_j|) . f_{i,k} / |f_{i,k}|. [N_t, D], [N_v, F, D] -> [N_t, N_v, F].
    inv_frame_norms [N_v, F] (inverse_norms(frames)), where given: made once for frames that meet many blocks of
    texts, as in evaluation, instead of again for each block."""
    inv = inverse_norms(frames) if inv_frame_norms is None else inv_frame_norms
    return torch.einsum("td,vfd->tvf", _unit(text), frames.float()) * inv


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / max(|x|, 1e-12) over the last axis, in fp32 (what F.normalize divides by)."""
    return torch.linalg.vector_norm(x.float(), dim=-1).clamp_min(1e-12).reciprocal()


class SimilarityRadius(nn.Module):
    """R = exp(W S + b). Parameter names follow the upstream `std_branch.linear_proj` (Linear(F -> D))."""

    def __init__(self, num_frames: int, dim: int):
        super().__init__()
        self.linear_proj = nn.Linear(num_frames, dim)
        nn.init.eye_(self.linear_proj.weight)
        nn.init.zeros_(self.linear_proj.bias)

    def forward(self, sims: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """S [..., F] -> R [..., D], in fp32. `out`: a contiguous fp32 buffer of R's shape to write R into, for
        inference (the bias enters as one more weight row against a constant 1: a product that only writes)."""
        w, b = self.linear_proj.weight.float(), self.linear_proj.bias.float()
        with torch.autocast(sims.device.type, enabled=False):
            if out is None:
                return F.linear(sims.float(), w, b).exp()
            s1 = torch.cat([sims.float(), torch.ones_like(sims[..., :1], dtype=torch.float32)], dim=-1)  # [S, 1]
            r = torch.mm(s1.view(-1, s1.shape[-1]), torch.cat([w.T, b[None]]), out=out.view(-1, w.shape[0]))
            return r.exp_().view(out.shape)


def stochastic_text(text: torch.Tensor, radius: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """t_s = t + R * eps (fp32)."""
    return text.float() + radius * eps.to(radius)


def support_text(text: torch.Tensor, radius: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """t_sup = t + R * (v_bar - t) / ||v_bar - t|| (fp32). [N, D] each; works for N = 1."""
    direction = center.float() - text.float()
    return text.float() + radius * F.normalize(direction, dim=-1)
