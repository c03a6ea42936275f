"""Text-conditioned frame pooling psi (X-Pool's single-head cross-attention; method notes a.1).

For texts t [N_t, D] and frames f [N_v, F, D], with one LayerNorm LN1 shared by both:
    q = W_q LN1(t) + b_q                       [N_t, D]
    k = W_k LN1(f) + b_k,  u = W_v LN1(f) + b_v [N_v, F, D]
    a[i, j, :] = softmax_F(k[i] q[j] / sqrt(D))  [N_v, N_t, F]
    h = LN2(W_o (a[i, j] u[i]) + b_o)           [N_v, N_t, D]
    psi(v_i | t_j) = LN3(h + Dropout(W_l h + b_l))
The projections start as the identity (biases 0). Any chunk of texts x any chunk of videos works, which the
sharded evaluation uses. Parameter names match the upstream checkpoints (`pool_frames.*`).

Computed per video, not per pair. With x = sum_f a_f u'_f (u' = W_o u + b_o) and sum_f a_f = 1, LN2's centring is
linear in a, so with the centred rows c_f = u'_f - mean_D(u'_f) and the F x F Gram G = c c^T of each video:
    h   = (1/s) sum_f a_f H_f + beta2,         H_f = gamma2 * c_f,  s = sqrt(a^T G a / D + eps_LN)
    W_l h + b_l = (1/s) sum_f a_f Z_f + W_l beta2 + b_l,             Z_f = W_l H_f
H, Z and G are made once per video ([N_v, F, D], [N_v, F, F]); a pair then costs O(F D + F^2) instead of the
O(D^2) of W_l applied to every pair. Out of training (Dropout is the identity) the two sums are one, over
Y_f = H_f + Z_f.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VideoSide:
    """What the pooling needs of a chunk of videos, made once (see the module's docstring)."""

    keys: torch.Tensor  # k [N_v, F, D]
    rows: torch.Tensor  # H [N_v, F, D] in training, Y = H + Z out of it
    proj_rows: torch.Tensor | None  # Z [N_v, F, D] in training, else None
    gram: torch.Tensor  # G [N_v, F, F], in at least float32

    def __getitem__(self, idx: slice | torch.Tensor) -> "VideoSide":
        return VideoSide(self.keys[idx], self.rows[idx], None if self.proj_rows is None else self.proj_rows[idx],
                         self.gram[idx])


class CrossAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def values(self, frames: torch.Tensor) -> torch.Tensor:
        """u' = W_o (W_v f + b_v) + b_o [N_v, F, D]: since the attention weights sum to 1, W_o (sum_f a_f u_f) + b_o
        = sum_f a_f u'_f, so the values are projected once per video, not once per (video, text) pair."""
        return self.out_proj(self.v_proj(frames))

    def weights(self, text: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """a = softmax_F(k q / sqrt(D)): text [N_t, D] (normalised), keys [N_v, F, D] -> [N_v, N_t, F]."""
        q = self.q_proj(text)
        return (torch.einsum("vfd,td->vtf", keys, q) / math.sqrt(q.shape[-1])).softmax(dim=-1)


class TextConditionedPool(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.layer_norm1, self.layer_norm2, self.layer_norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim)
        self.linear_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if "proj" in name:  # q/k/v/out_proj and linear_proj: identity weights, zero biases
                nn.init.eye_(p) if p.dim() == 2 else nn.init.zeros_(p)

    def video_side(self, frames: torch.Tensor) -> VideoSide:
        """frames [N_v, F, D] -> keys, rows and Gram of every video (the per-video half of the pooling)."""
        f = self.layer_norm1(frames)
        u = self.cross_attn.values(f)
        c = u - u.mean(dim=-1, keepdim=True)  # centred values c_f
        c32 = c.to(torch.promote_types(c.dtype, torch.float32))  # the statistics in at least float32
        gram = torch.einsum("vfd,vgd->vfg", c32, c32)  # G [N_v, F, F]
        rows = self.layer_norm2.weight * c  # H_f = gamma2 * c_f
        proj = rows @ self.linear_proj.weight.T  # Z_f = W_l H_f
        keys = self.cross_attn.k_proj(f)
        if self.training:
            return VideoSide(keys, rows, proj, gram)
        return VideoSide(keys, rows + proj, None, gram)

    def pool(self, text: torch.Tensor, side: VideoSide, text_major: bool = False) -> torch.Tensor:
        """text [N_t, D] against prepared videos -> psi [N_v, N_t, D] ([N_t, N_v, D] if text_major); O(F D + F^2)
        per pair. The 1/s of LN2 scales the F attention weights, and each sum is one batched product."""
        a = self.cross_attn.weights(self.layer_norm1(text), side.keys)  # [N_v, N_t, F]
        af = a.to(side.gram.dtype)
        var = torch.einsum("vtf,vfg,vtg->vt", af, side.gram, af) / side.keys.shape[-1]  # a^T G a / D
        a = a * torch.rsqrt(var + self.layer_norm2.eps).to(a.dtype)[..., None]  # a_f / s
        beta2, wl, bl = self.layer_norm2.bias, self.linear_proj.weight, self.linear_proj.bias
        if side.proj_rows is None:  # z = h + W_l h + b_l = sum_f (a_f / s) Y_f + beta2 + W_l beta2 + b_l
            z = torch.baddbmm(beta2 + beta2 @ wl.T + bl, a, side.rows)
        else:  # z = h + Dropout(W_l h + b_l)
            z = torch.baddbmm(beta2, a, side.rows) + self.dropout(torch.baddbmm(beta2 @ wl.T + bl, a, side.proj_rows))
        return self.layer_norm3(z.transpose(0, 1) if text_major else z)

    def forward(self, text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """text [N_t, D], frames [N_v, F, D] -> pooled videos [N_v, N_t, D]."""
        return self.pool(text, self.video_side(frames))
