"""Text-conditioned frame pooling psi (X-Pool's single-head cross-attention; docs/method.md).

For texts t [N_t, D] and frames f [N_v, F, D], with one LayerNorm LN1 shared by both:
    q = W_q LN1(t) + b_q                       [N_t, D]
    k = W_k LN1(f) + b_k,  u = W_v LN1(f) + b_v [N_v, F, D]
    a[i, j, :] = softmax_F(k[i] q[j] / sqrt(D))  [N_v, N_t, F]
    h = LN2(W_o (a[i, j] u[i]) + b_o)           [N_v, N_t, D]
    psi(v_i | t_j) = LN3(h + Dropout(W_l h + b_l))
In training, Dropout's mask of pair (i, j) is keyed by the pair's global ids and the step
(noise.pair_dropout_mask), given as `dropout_key`; without one, torch's own Dropout draws it.
The projections start as the identity (biases 0). Any chunk of texts x any chunk of videos works, which the
sharded evaluation uses. Parameter names match the upstream checkpoints (`pool_frames.*`).

Computed per video, not per pair. With x = sum_f a_f u'_f (u' = W_o u + b_o) and sum_f a_f = 1, LN2's centring is
linear in a, so with the centred rows c_f = u'_f - mean_D(u'_f) and the F x F Gram G = c c^T of each video:
    h   = (1/s) sum_f a_f H_f + beta2,         H_f = gamma2 * c_f,  s = sqrt(a^T G a / D + eps_LN)
    W_l h + b_l = (1/s) sum_f a_f Z_f + W_l beta2 + b_l,             Z_f = W_l H_f
H, Z and G are made once per video ([N_v, F, D], [N_v, F, F]); a pair then costs O(F D + F^2) instead of the
O(D^2) of W_l applied to every pair. That is the training branch (Dropout sits between the two sums).
Out of training the sums are one, z = sum_f w_f Y_f + c0 (w = a / s, Y_f = H_f + Z_f, c0 = beta2 + W_l beta2 + b_l),
and LN3 folds in the same way: with the rows X = [Y; c0] centred over D and their (F+1) x (F+1) Gram G3,
    psi = LN3(z) = sum_k (x_k / s3) gamma3 * X_k + beta3,   x = [w, 1],  s3 = sqrt(x^T G3 x / D + eps_LN)
so psi(v_i | t_j) = c_ij B_i: coefficients c = [x / s3, 1] [N_v, N_t, F+2] times a basis B = [gamma3 * X; beta3]
[N_v, F+2, D] made once per video. A pair costs one O(F D) product, which writes psi and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from .noise import pair_dropout_mask


@dataclass
class VideoSide:
    """What the pooling needs of a chunk of videos, made once (see the module's docstring)."""

    keys: torch.Tensor  # k [N_v, F, D]
    rows: torch.Tensor  # training: H [N_v, F, D]; out of it: the basis B [N_v, F+2, D], in at least float32
    proj_rows: torch.Tensor | None  # training: Z [N_v, F, D]; else None
    gram: torch.Tensor  # G [N_v, F, F], in at least float32
    gram3: torch.Tensor | None = None  # out of training: G3 [N_v, F+1, F+1]
    basis_gram: torch.Tensor | None = None  # out of training: B B^T [N_v, F+2, F+2], for |psi|

    def parts(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in fields(self)]

    def __getitem__(self, idx: slice | torch.Tensor) -> "VideoSide":
        return VideoSide(*(None if x is None else x[idx] for x in self.parts()))


class CrossAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def values(self, frames: torch.Tensor) -> torch.Tensor:
        """u' = W_o (W_v f + b_v) + b_o [N_v, F, D]: since the attention weights sum to 1, W_o (sum_f a_f u_f) + b_o
        = sum_f a_f u'_f, so the values are projected once per video, not once per (video, text) pair."""
        return self.out_proj(self.v_proj(frames))

    def weights(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """a = softmax_F(k q / sqrt(D)): queries q [N_t, D], keys [N_v, F, D] -> [N_v, N_t, F], a view of
        [N_v, F, N_t] (a softmax over a last axis of F = 12 is ~10x slower on the CPU)."""
        logits = torch.einsum("vfd,td->vft", keys, queries) / math.sqrt(queries.shape[-1])
        return logits.softmax(dim=1).transpose(1, 2)


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

    def video_side(self, frames: torch.Tensor, block: int = 0) -> VideoSide:
        """frames [N_v, F, D] -> keys, rows and Grams of every video (the per-video half of the pooling).
        block > 0 (inference): `block` videos at a time, written into the outputs, so that the ~10 intermediates
        of [N_v, F, D] are only ever made for a block (1k videos: peak 250 MB -> 90 MB, 53 MB of it the outputs)."""
        if 0 < block < len(frames):
            out = None
            for i in range(0, len(frames), block):
                part = self.video_side(frames[i : i + block])
                if out is None:
                    out = VideoSide(
                        *(None if x is None else x.new_empty((len(frames), *x.shape[1:])) for x in part.parts())
                    )
                for o, x in zip(out.parts(), part.parts()):
                    if o is not None:
                        o[i : i + len(x)] = x
            return out
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
        beta2, wl, bl = self.layer_norm2.bias, self.linear_proj.weight, self.linear_proj.bias
        c0 = (beta2 + beta2 @ wl.T + bl).to(c32.dtype).expand(len(c), 1, -1)
        x = torch.cat([(rows + proj).to(c32.dtype), c0], dim=1)  # X = [Y; c0] [N_v, F+1, D]
        x = x - x.mean(dim=-1, keepdim=True)
        gram3 = torch.einsum("vfd,vgd->vfg", x, x)  # G3 [N_v, F+1, F+1]
        beta3 = self.layer_norm3.bias.to(c32.dtype).expand(len(c), 1, -1)
        basis = torch.cat([self.layer_norm3.weight * x, beta3], dim=1)  # B = [gamma3 * X; beta3] [N_v, F+2, D]
        return VideoSide(keys, basis, None, gram, gram3, basis @ basis.transpose(1, 2))

    def text_side(self, text: torch.Tensor) -> torch.Tensor:
        """text [N_t, D] -> queries q = W_q LN1(t) + b_q [N_t, D] (the per-text half of the pooling)."""
        return self.cross_attn.q_proj(self.layer_norm1(text))

    def _attention(self, queries: torch.Tensor, side: VideoSide) -> torch.Tensor:
        """a_f / s [N_v, N_t, F]: the attention weights with LN2's 1/s, in the Gram's dtype."""
        a = self.cross_attn.weights(queries, side.keys).to(side.gram.dtype)  # [N_v, N_t, F]
        var = torch.einsum("vtf,vfg,vtg->vt", a, side.gram, a) / side.keys.shape[-1]  # a^T G a / D
        return a * torch.rsqrt(var + self.layer_norm2.eps)[..., None]

    def coefficients(self, queries: torch.Tensor, side: VideoSide) -> torch.Tensor:
        """Out of training: c [N_v, N_t, F+2] with psi(v_i | t_j) = c_ij B_i. O(F^2) per pair."""
        w = self._attention(queries, side)
        one = torch.ones_like(w[..., :1])
        x = torch.cat([w, one], dim=-1)  # [w, 1]
        var = torch.einsum("vtf,vfg,vtg->vt", x, side.gram3, x) / side.keys.shape[-1]  # x^T G3 x / D
        return torch.cat([x * torch.rsqrt(var + self.layer_norm3.eps)[..., None], one], dim=-1)

    def unit_coefficients(self, queries: torch.Tensor, side: VideoSide) -> torch.Tensor:
        """Out of training: c / |c B| [N_v, N_t, F+2], the coefficients of psi / |psi|, with |c B|^2 = c^T (B B^T) c."""
        c = self.coefficients(queries, side)
        return c * torch.einsum("vtk,vkl,vtl->vt", c, side.basis_gram, c).rsqrt()[..., None]

    @staticmethod
    def combine(
        c: torch.Tensor, side: VideoSide, text_major: bool = False, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Out of training: psi = c B [N_v, N_t, D] (a [N_t, N_v, D] view if text_major) from coefficients c
        [N_v, N_t, F+2] and the basis B = side.rows [N_v, F+2, D]; one batched product, into `out` if given."""
        z = torch.bmm(c, side.rows, out=out)
        return z.transpose(0, 1) if text_major else z

    def pool(
        self,
        queries: torch.Tensor,
        side: VideoSide,
        text_major: bool = False,
        unit: bool = False,
        out: torch.Tensor | None = None,
        dropout_key: tuple | None = None,
    ) -> torch.Tensor:
        """Prepared texts (text_side) against prepared videos (video_side) -> psi [N_v, N_t, D] (a [N_t, N_v, D]
        view if text_major); O(F D + F^2) per pair. unit: psi / |psi|, out of training through the coefficients,
        |psi|^2 = c^T (B B^T) c. `out` [N_v, N_t, D]: a buffer to write psi into, out of training.
        dropout_key (training): (stream, video_ids [N_v], text_ids [N_t]), the pairs' global ids."""
        if side.gram3 is not None:  # psi = c B: one batched product
            c = self.unit_coefficients(queries, side) if unit else self.coefficients(queries, side)
            return self.combine(c, side, text_major, out)
        else:  # training: z = h + Dropout(W_l h + b_l), h = sum_f (a_f / s) H_f + beta2
            a = self._attention(queries, side).to(side.rows.dtype)
            beta2, wl, bl = self.layer_norm2.bias, self.linear_proj.weight, self.linear_proj.bias
            lin = torch.baddbmm(beta2 @ wl.T + bl, a, side.proj_rows)  # W_l h + b_l [N_v, N_t, D]
            if dropout_key is not None and self.dropout.p > 0:
                lin = lin * pair_dropout_mask(*dropout_key, lin.shape[-1], self.dropout.p, lin.dtype)
            else:
                lin = self.dropout(lin)
            z = self.layer_norm3(torch.baddbmm(beta2, a, side.rows) + lin)
            z = nn.functional.normalize(z, dim=-1) if unit else z
        return z.transpose(0, 1) if text_major else z

    def forward(self, text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """text [N_t, D], frames [N_v, F, D] -> pooled videos [N_v, N_t, D]."""
        return self.pool(self.text_side(text), self.video_side(frames))
