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


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (seed, step, sample index, ...): the same numbers for
    the same key on every rank, in every world size."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def keyed_noise(keys: list[tuple[int, ...]], dim: int, prior: str, std: float) -> torch.Tensor:
    """One noise row [dim] per key, each from its own keyed generator: [len(keys), dim] on the CPU."""
    if not keys:
        return torch.empty(0, dim)
    return torch.stack([draw_noise((dim,), prior, std, keyed_generator(*k)) for k in keys])


def stochastic_text(text: torch.Tensor, radius: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """t_s = t + R * eps (fp32)."""
    return text.float() + radius * eps.to(radius)


def support_text(text: torch.Tensor, radius: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """t_sup = t + R * (v_bar - t) / ||v_bar - t|| (fp32). [N, D] each; works for N = 1."""
    direction = center.float() - text.float()
    return text.float() + radius * F.normalize(direction, dim=-1)
