"""The text mass: similarity-aware radius, stochastic text and support text (method notes a.2, a.3, a.5).

All of it runs in fp32, whatever precision the towers use: exp() of a bf16 radius loses too much.

    S[.., k]  = cos(t, f_k)                         [..., F]   (one text against one video's frames)
    R         = exp(S W^T + b)                       [..., D]   W [D, F] starts as the identity, b = 0,
                                                                so R = e^S on the first F dims, 1 elsewhere
    t_s       = t + R * eps,  eps ~ U[0, 1) or N(0, std^2)      (the stochastic text)
    t_sup     = t + R * (v_bar - t) / ||v_bar - t||             (the support text, on the mass's surface)
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def paired_cosines(text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """S[n, k] = cos(t_n, f_{n,k}): text n with the frames of video n. [N, D], [N, F, D] -> [N, F]."""
    return torch.einsum("nd,nfd->nf", _unit(text), _unit(frames))


def all_cosines(text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """S[j, i, k] = cos(t_j, f_{i,k}) for every text and video. [N_t, D], [N_v, F, D] -> [N_t, N_v, F]."""
    return torch.einsum("td,vfd->tvf", _unit(text), _unit(frames))


class SimilarityRadius(nn.Module):
    """R = exp(W S + b). Parameter names follow the upstream `std_branch.linear_proj` (Linear(F -> D))."""

    def __init__(self, num_frames: int, dim: int):
        super().__init__()
        self.linear_proj = nn.Linear(num_frames, dim)
        nn.init.eye_(self.linear_proj.weight)
        nn.init.zeros_(self.linear_proj.bias)

    def forward(self, sims: torch.Tensor) -> torch.Tensor:
        """S [..., F] -> R [..., D], in fp32."""
        w, b = self.linear_proj.weight.float(), self.linear_proj.bias.float()
        with torch.autocast(sims.device.type, enabled=False):
            return F.linear(sims.float(), w, b).exp()


def draw_noise(shape: tuple[int, ...], prior: str, std: float, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """eps ~ U[0, 1) (upstream's default, not zero-mean) or N(0, std^2), drawn from `generator`."""
    if prior == "uniform01":
        return torch.rand(shape, generator=generator, device=device)
    if prior == "normal":
        return torch.randn(shape, generator=generator, device=device) * std
    raise ValueError(f"unknown stochastic prior {prior!r}")


def _philox(key: tuple, start_words: int) -> np.random.Generator:
    """A counter-based stream of 32-bit words, positioned at word `start_words` (a multiple of 8: Philox-4x64
    makes 8 such words per counter step)."""
    words = np.frombuffer(hashlib.blake2b(repr(tuple(key)).encode(), digest_size=16).digest(), dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=words, counter=np.array([start_words // 8, 0, 0, 0], np.uint64)))


def keyed_noise(key: tuple, count: int, dim: int, prior: str, std: float, first: int = 0) -> torch.Tensor:
    """Rows first .. first+count-1 of the noise stream `key`, each `dim` draws of the prior: [count, dim] fp32.

    Row r always holds the same numbers, however the rows are fetched (one at a time or in blocks, on any
    rank), so results do not depend on the world size or the chunk size."""
    per_row = dim if prior == "uniform01" else 2 * dim  # Box-Muller takes two uniforms per normal
    stride = -(-per_row // 8) * 8
    u = _philox(key, first * stride).random(count * stride, dtype=np.float32).reshape(count, stride)
    if prior == "uniform01":
        return torch.from_numpy(u[:, :dim])
    if prior == "normal":
        z = np.sqrt(-2.0 * np.log1p(-u[:, :dim])) * np.cos(np.float32(2 * np.pi) * u[:, dim:per_row]) * np.float32(std)
        return torch.from_numpy(z.astype(np.float32, copy=False))
    raise ValueError(f"unknown stochastic prior {prior!r}")


def stochastic_text(text: torch.Tensor, radius: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """t_s = t + R * eps (fp32)."""
    return text.float() + radius * eps.to(radius)


def support_text(text: torch.Tensor, radius: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """t_sup = t + R * (v_bar - t) / ||v_bar - t|| (fp32). [N, D] each; works for N = 1."""
    direction = center.float() - text.float()
    return text.float() + radius * F.normalize(direction, dim=-1)
