"""Text-conditioned frame pooling psi (X-Pool's single-head cross-attention; method notes a.1).

For texts t [N_t, D] and frames f [N_v, F, D], with one LayerNorm LN1 shared by both:
    q = W_q LN1(t) + b_q                       [N_t, D]
    k = W_k LN1(f) + b_k,  u = W_v LN1(f) + b_v [N_v, F, D]
    a[i, j, :] = softmax_F(k[i] q[j] / sqrt(D))  [N_v, N_t, F]
    h = LN2(W_o (a[i, j] u[i]) + b_o)           [N_v, N_t, D]
    psi(v_i | t_j) = LN3(h + Dropout(W_l h + b_l))
The projections start as the identity (biases 0). Any chunk of texts x any chunk of videos works, which the
sharded evaluation uses. Parameter names match the upstream checkpoints (`pool_frames.*`).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(text)  # [N_t, D]
        k = self.k_proj(frames)  # [N_v, F, D]
        # W_o (sum_f a_f u_f) + b_o = sum_f a_f (W_o u_f + b_o) since the weights sum to 1: projecting the
        # F values once per video instead of once per (video, text) pair saves a D x D product per pair.
        u = self.out_proj(self.v_proj(frames))  # [N_v, F, D]
        logits = torch.einsum("vfd,td->vtf", k, q) / math.sqrt(q.shape[-1])  # [N_v, N_t, F]
        return torch.einsum("vtf,vfd->vtd", logits.softmax(dim=-1), u)  # [N_v, N_t, D]


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

    def forward(self, text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """text [N_t, D], frames [N_v, F, D] -> pooled videos [N_v, N_t, D]."""
        h = self.layer_norm2(self.cross_attn(self.layer_norm1(text), self.layer_norm1(frames)))
        return self.layer_norm3(h + self.dropout(self.linear_proj(h)))
