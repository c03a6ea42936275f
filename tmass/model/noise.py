"""Counter-based noise: every random number of the text mass and of the pooling's dropout is a pure function of
(stream, row key, trial, dim), computed with torch integer ops on any device. So any row can be drawn alone, in
any chunk, on any rank, and inside a compiled kernel: training does not depend on the world size, and evaluation
not on the world size or the chunk size.

    u[r, m, d] = mix32(key_r + table[m, d]) / 2^32 (24 bits kept),   table[m, d] = mix32(m D + d + salt)
    eps        = u  (uniform01)  or  std sqrt(-2 ln(1 - u1)) cos(2 pi u2)  (normal, Box-Muller on two streams)

mix32 is a bijection of 32-bit words (Wellons' "lowbias32"). The words are int32 lanes read as unsigned: sums and
products wrap mod 2^32 (two's complement, on every backend torch has), right shifts are masked to be logical.
"""

from __future__ import annotations

import hashlib
import math
import typing
from typing import NamedTuple

import torch


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


def keyed_noise(
    stream: tuple, rows: torch.Tensor, trials: int, dim: int, prior: str, std: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """eps [len(rows), M, D] of rows `rows` (integer ids) of `stream`: row r holds the same numbers however the
    rows are fetched, so results do not depend on the world size or the chunk size."""
    table = noise_table(stream, trials, dim, device)
    return counter_noise(row_keys(stream, torch.as_tensor(rows, device=device)), table, prior, std)


def pair_dropout_mask(
    stream: tuple,
    video_ids: torch.Tensor,
    text_ids: torch.Tensor,
    dim: int,
    p: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dropout's multiplier for pairs (video i, text j) of a batch, [N_v, N_t, D]:
        m[i, j, d] = 1[u(stream, i, j, d) >= p] / (1 - p),   u the counter-based uniform above
    a pure function of the pair's global ids, so a pair has one mask whichever rank pools it and in whichever
    direction of the loss (the world size does not change training), and a resumed step draws the same."""
    keys = row_keys(stream, video_ids[:, None], text_ids[None, :])  # [N_v, N_t]
    u = _uniform(keys[..., None], noise_table(stream, 1, dim, video_ids.device)[0, 0])  # [N_v, N_t, D]
    return (u >= p).to(dtype) * (1.0 / (1.0 - p))


# ------------------------------------------------------------------------------------ the two noise modes
# Evaluation scores a block of texts t [c_t, D] against a chunk of videos with, per pair, the radius R and the
# unit pooled video p (both [c_t, c_v, D]); each mode draws eps its own way and has its own fastest form of
#     cos(t + R*eps, p) = (t.p + (R*p).eps) / sqrt(|t|^2 + 2 (t*R).eps + (R*R).(eps*eps))      (|p| = 1)


class PerTextTrials(NamedTuple):
    """--trial_noise per_text: eps_{j,m}, one draw per (text j, trial m) from the stream (seed, "text"), shared by
    every video (common random numbers), with the products that every chunk of videos reuses. The trials become
    three batched products; nothing of size [pairs, M, D] is made."""

    eps: torch.Tensor  # [c_t, M, D]
    t_eps: torch.Tensor  # t * eps [c_t, M, D]
    eps2: torch.Tensor  # eps * eps [c_t, M, D]

    @classmethod
    def for_texts(
        cls, seed: int, ids: torch.Tensor, t: torch.Tensor, trials: int, prior: str, std: float, **_
    ) -> "PerTextTrials":
        eps = keyed_noise((seed, "text"), ids, trials, t.shape[1], prior, std, t.device)
        return cls(eps, t.float()[:, None, :] * eps, eps * eps)

    def for_videos(self, video_ids: torch.Tensor) -> "PerTextTrials":
        return self  # the same draws for every video

    def cosines(
        self, t: torch.Tensor, radius: torch.Tensor, p: torch.Tensor, base: torch.Tensor, in_place: bool = False
    ) -> torch.Tensor:
        """cos(t_j + R_ji * eps_jm, p_ji) [c_t, c_v, M] (a view of [c_t, M, c_v]), base = t.p [c_t, c_v]. The
        products are [M, D] x [D, c_v] per text: the trials as the rows, the videos as the long side.
        in_place: radius and p are scratch (a Workspace's), overwritten with
        R*R and R*p, and the [c_t, M, c_v] terms are summed into two tensors instead of ten."""
        eps, t_eps, eps2 = self.eps, self.t_eps, self.eps2  # [c_t, M, D] each
        t2 = (t * t).sum(-1)[:, None, None]  # |t|^2 [c_t, 1, 1]
        if not in_place:
            b = torch.bmm(t_eps, radius.mT)  # (t*R).eps [c_t, M, c_v]
            a = torch.bmm(eps, (p * radius).mT)  # (R*p).eps
            c = torch.bmm(eps2, (radius * radius).mT)  # (R*R).(eps*eps)
            return ((base[:, None, :] + a) * (t2 + 2 * b + c).clamp_min(1e-12).rsqrt()).mT
        norm2 = torch.bmm(t_eps, radius.mT)  # (t*R).eps
        a = torch.baddbmm(base[:, None, :], eps, p.mul_(radius).mT)  # t.p + (R*p).eps
        norm2.baddbmm_(eps2, radius.square_().mT, beta=2).add_(t2)  # |t|^2 + 2 (t*R).eps + (R*R).(eps*eps)
        return a.mul_(norm2.clamp_min_(1e-12).rsqrt_()).mT

    def best(
        self, t: torch.Tensor, radius: torch.Tensor, p: torch.Tensor, base: torch.Tensor, in_place: bool = False
    ) -> torch.Tensor:
        """max_m cos(t_j + R_ji * eps_jm, p_ji) [c_t, c_v]."""
        return self.cosines(t, radius, p, base, in_place).mT.amax(dim=1)

    def chosen(self, best: torch.Tensor) -> torch.Tensor:
        """eps of trial best[j, i] for each pair [c_t, c_v, D]."""
        c_t, c_v, dim = *best.shape, self.eps.shape[2]
        return self.eps.gather(1, best.reshape(c_t, -1, 1).expand(-1, -1, dim)).view(c_t, c_v, dim)


def per_pair_cosines(t: torch.Tensor, radius: torch.Tensor, p: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The formula with an eps of its own for every pair: eps [c_t, c_v, M, D] -> [c_t, c_v, M]. As sums over D,
    which a compiled kernel fuses with the drawing of eps: nothing of size [pairs, M, D] is stored."""
    base = (p * t[:, None, :]).sum(-1)
    a = (eps * (radius * p)[:, :, None, :]).sum(-1)  # (R*p).eps
    b = (eps * (radius * t[:, None, :])[:, :, None, :]).sum(-1)  # (t*R).eps
    c = (eps * eps * (radius * radius)[:, :, None, :]).sum(-1)  # (R*R).(eps*eps)
    norm2 = (t * t).sum(-1)[:, None, None] + 2 * b + c
    return (base[..., None] + a) * norm2.clamp_min(1e-12).rsqrt()


def per_pair_best(
    t: torch.Tensor,
    radius: torch.Tensor,
    p: torch.Tensor,
    keys: torch.Tensor,
    table: torch.Tensor,
    prior: str,
    std: float,
) -> torch.Tensor:
    """max_m over per_pair_cosines [c_t, c_v], eps drawn from the pairs' keys [c_t, c_v]: what --eval_compile
    compiles, so that each eps is hashed inside the kernel where the sums over D use it."""
    return per_pair_cosines(t, radius, p, counter_noise(keys, table, prior, std)).amax(dim=-1)


class PerPairTrials(NamedTuple):
    """--trial_noise per_pair: eps_{j,i,m}, an independent draw for every (text j, video i, trial m) from the
    stream (seed, "pair") keyed by (j, i), as upstream. `kernel` is per_pair_best, or its compiled form."""

    seed: int
    ids: torch.Tensor  # [c_t] global text ids
    table: torch.Tensor  # noise_table((seed, "pair"), M, D)
    prior: str
    std: float
    kernel: typing.Callable = per_pair_best
    keys: torch.Tensor | None = None  # [c_t, c_v], once for_videos is called

    @classmethod
    def for_texts(
        cls,
        seed: int,
        ids: torch.Tensor,
        t: torch.Tensor,
        trials: int,
        prior: str,
        std: float,
        table: torch.Tensor | None = None,
        kernel: typing.Callable | None = None,
    ) -> "PerPairTrials":
        table = noise_table((seed, "pair"), trials, t.shape[1], t.device) if table is None else table
        return cls(seed, ids, table, prior, std, kernel or per_pair_best)

    def for_videos(self, video_ids: torch.Tensor) -> "PerPairTrials":
        return self._replace(keys=row_keys((self.seed, "pair"), self.ids[:, None], video_ids[None, :]))

    def eps(self) -> torch.Tensor:
        return counter_noise(self.keys, self.table, self.prior, self.std)  # [c_t, c_v, M, D]

    def cosines(
        self,
        t: torch.Tensor,
        radius: torch.Tensor,
        p: torch.Tensor,
        base: torch.Tensor | None = None,
        in_place: bool = False,
    ) -> torch.Tensor:
        return per_pair_cosines(t, radius, p, self.eps())  # base = t.p is recomputed inside: the kernel fuses it

    def best(
        self,
        t: torch.Tensor,
        radius: torch.Tensor,
        p: torch.Tensor,
        base: torch.Tensor | None = None,
        in_place: bool = False,
    ) -> torch.Tensor:
        return self.kernel(t, radius, p, self.keys, self.table, self.prior, self.std)

    def chosen(self, best: torch.Tensor) -> torch.Tensor:
        eps = self.eps()
        return eps.gather(2, best[..., None, None].expand(-1, -1, 1, eps.shape[-1])).squeeze(2)


NOISE_MODES = {"per_text": PerTextTrials, "per_pair": PerPairTrials}
