"""The text mass: similarity-aware radius, stochastic text and support text (docs/method.md).

All of it runs in fp32, whatever precision the towers use: exp() of a bf16 radius loses too much.

    S[.., k]  = cos(t, f_k)                         [..., F]   (one text against one video's frames)
    R         = exp(S W^T + b)                       [..., D]   W [D, F] starts as the identity, b = 0,
                                                                so R = e^S on the first F dims, 1 elsewhere
    t_s       = t + R * eps,  eps ~ U[0, 1) or N(0, std^2)      (the stochastic text)
    t_sup     = t + R * (v_bar - t) / ||v_bar - t||             (the support text, on the mass's surface)
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def paired_cosines(text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """S[n, k] = cos(t_n, f_{n,k}): text n with the frames of video n. [N, D], [N, F, D] -> [N, F]."""
    return torch.einsum("nd,nfd->nf", _unit(text), _unit(frames))


def all_cosines(text: torch.Tensor, frames: torch.Tensor,
                inv_frame_norms: torch.Tensor | None = None) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------- counter-based noise
# eps[r, m, d] is a pure function of (stream, row key r, trial m, dim d), computed with torch integer ops on any
# device, so any row can be drawn alone, in any chunk, on any rank, and inside a compiled kernel:
#     u[r, m, d] = mix32(key_r + table[m, d]) / 2^32 (24 bits kept),  table[m, d] = mix32(m D + d + salt)
# mix32 is a bijection of 32-bit words (Wellons' "lowbias32"). The words are int32 lanes read as unsigned: sums
# and products wrap mod 2^32 (two's complement, on every backend torch has), right shifts are masked to be
# logical. Normal draws: Box-Muller on two such streams, eps = std sqrt(-2 ln(1 - u1)) cos(2 pi u2).


def _i32(c: int) -> int:
    """A 32-bit word as the int32 of the same bits."""
    c &= 0xFFFFFFFF
    return c - 2**32 if c >= 2**31 else c


def words(x: torch.Tensor) -> torch.Tensor:
    """Integers -> their low 32 bits, as int32 words."""
    return (x.long() & 0xFFFFFFFF).to(torch.int32) if x.dtype != torch.int32 else x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: an invertible 32-bit hash with near-ideal avalanche, on int32 words."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _i32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def salt(key: tuple) -> int:
    """A 32-bit word naming one noise stream, e.g. (seed, "text") or (seed, "train", step, micro)."""
    return int.from_bytes(hashlib.blake2b(repr(tuple(key)).encode(), digest_size=4).digest(), "little")


def row_keys(stream: tuple, *ids: torch.Tensor) -> torch.Tensor:
    """The key word of each row of `stream`, from one or two integer ids per row (a text; a text and a video).
    One id gives distinct keys for distinct ids below 2^32 (mix32 is a bijection)."""
    s = salt(stream)
    key = mix32(words(ids[0]) + _i32(s))
    for k, other in enumerate(ids[1:], 1):  # a salt per position: (j, i) and (i, j) get different keys
        key = mix32(key + mix32(words(other) + _i32(s + 0x9E3779B9 * k)))
    return key


def noise_table(stream: tuple, trials: int, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """table [2, M, D] (int32 words): the counter half of every draw, made once per stream and shape."""
    c = torch.arange(trials * dim, device=device, dtype=torch.int32).view(trials, dim)
    s = salt(stream)
    return torch.stack([mix32(c + _i32(s)), mix32(c + _i32(s ^ 0x5BD1E995))])


def _uniform(keys: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return ((mix32(keys + table) >> 8) & 0xFFFFFF).float() * (1.0 / 16777216)  # 24 bits: exact in fp32, in [0, 1)


def counter_noise(keys: torch.Tensor, table: torch.Tensor, prior: str, std: float) -> torch.Tensor:
    """eps [..., M, D] for row keys [...] and a noise_table [2, M, D]; U[0, 1) or N(0, std^2), fp32."""
    keys = keys[..., None, None]
    if prior == "uniform01":
        return _uniform(keys, table[0])
    if prior == "normal":
        u1, u2 = _uniform(keys, table[0]), _uniform(keys, table[1])
        return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos((2 * math.pi) * u2) * std
    raise ValueError(f"unknown stochastic prior {prior!r}")


def keyed_noise(stream: tuple, rows: torch.Tensor, trials: int, dim: int, prior: str, std: float,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """eps [len(rows), M, D] of rows `rows` (integer ids) of `stream`: row r holds the same numbers however the
    rows are fetched, so results do not depend on the world size or the chunk size."""
    table = noise_table(stream, trials, dim, device)
    return counter_noise(row_keys(stream, torch.as_tensor(rows, device=device)), table, prior, std)


def pair_dropout_mask(stream: tuple, video_ids: torch.Tensor, text_ids: torch.Tensor, dim: int, p: float,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dropout's multiplier for pairs (video i, text j) of a batch, [N_v, N_t, D]:
        m[i, j, d] = 1[u(stream, i, j, d) >= p] / (1 - p),   u the counter-based uniform above
    a pure function of the pair's global ids, so a pair has one mask whichever rank pools it and in whichever
    direction of the loss (the world size does not change training), and a resumed step draws the same."""
    keys = row_keys(stream, video_ids[:, None], text_ids[None, :])  # [N_v, N_t]
    u = _uniform(keys[..., None], noise_table(stream, 1, dim, video_ids.device)[0, 0])  # [N_v, N_t, D]
    return (u >= p).to(dtype) * (1.0 / (1.0 - p))


def stochastic_text(text: torch.Tensor, radius: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """t_s = t + R * eps (fp32)."""
    return text.float() + radius * eps.to(radius)


def support_text(text: torch.Tensor, radius: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """t_sup = t + R * (v_bar - t) / ||v_bar - t|| (fp32). [N, D] each; works for N = 1."""
    direction = center.float() - text.float()
    return text.float() + radius * F.normalize(direction, dim=-1)
