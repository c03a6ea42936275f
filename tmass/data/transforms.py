"""Clip transforms on uint8 frames [F, H, W, 3] -> uint8 [F, 3, S, S]; one draw per clip, applied to every
frame (as upstream applies torchvision's transforms to the whole [F, 3, H, W] tensor).

    train: RandomResizedCrop(S, scale=(--crop_scale_min 0.5, 1), ratio=(3/4, 4/3)), then a horizontal flip
           with p = --hflip_prob 0.5 (a flip turns "moves left" into "moves right": the demo sets it to 0)
    eval:  resize the short side to S (bicubic), centre crop S x S
    normalize (on the consumer's device, in float): (x / 255 - mean) / std, the CLIP's own statistics
               (ModelConfig.pixel_stats)
Pixels stay uint8 until `normalize`: 4x fewer bytes through the loader and to the GPU.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from ..config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def _chw(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[F, H, W, 3] -> a [F, 3, H, W] view (channels-last memory: the fast layout for uint8 resizing)."""
    t = torch.from_numpy(frames) if isinstance(frames, np.ndarray) else frames
    return t.permute(0, 3, 1, 2)


def crop_box(height: int, width: int, rng: random.Random, scale: tuple[float, float] = (0.5, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop of area fraction in `scale` and aspect in `ratio` (torchvision's
    RandomResizedCrop rule: 10 tries, then the largest centred crop of an allowed aspect)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(frames: np.ndarray, size: int, rng: random.Random, crop_scale_min: float = 0.5,
                    hflip_prob: float = 0.5) -> torch.Tensor:
    x = _chw(frames)
    top, left, h, w = crop_box(x.shape[2], x.shape[3], rng, scale=(crop_scale_min, 1.0))
    x = F.interpolate(x[:, :, top:top + h, left:left + w], size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    if rng.random() < hflip_prob:
        x = x.flip(-1)
    return x.contiguous()


def eval_transform(frames: np.ndarray, size: int) -> torch.Tensor:
    x = _chw(frames)
    h, w = x.shape[2:]
    # torchvision's Resize(size): the short side becomes `size`, the long side int(size * long / short)
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, :, top:top + size, left:left + size].contiguous()


def normalize(
    video: torch.Tensor, stats: tuple[tuple[float, ...], tuple[float, ...]] = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float (x / 255 - mean) / std, on whatever device `video` is; stats (mean, std)."""
    mean = torch.tensor(stats[0], device=video.device).view(3, 1, 1)
    std = torch.tensor(stats[1], device=video.device).view(3, 1, 1)
    return (video.float() / 255.0 - mean) / std
