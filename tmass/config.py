"""Configuration dataclasses. Defaults follow the upstream T-MASS code (method notes, section c).

The training configuration (issue #5) grows this module into one tree with its argparse; the model part is
here already, because the model, the loss and the checkpoint import all read it.
"""
from __future__ import annotations

from dataclasses import dataclass

CLIP_ARCHS = ("ViT-B/32", "ViT-B/16", "tiny")
PRIORS = ("uniform01", "normal")
SUPPORT_CENTERS = ("upstream", "paper")


@dataclass
class ModelConfig:
    clip_arch: str = "ViT-B/32"  # ViT-B/32, ViT-B/16, or tiny (a small random CLIP for tests and the demo)
    clip_path: str | None = None  # a local HF CLIP checkpoint directory; None: random weights of clip_arch
    num_frames: int = 12
    transformer_dropout: float = 0.3
    stochastic_prior: str = "uniform01"  # upstream default; or "normal"
    stochastic_prior_std: float = 1.0  # std of the normal prior (LSMDC: 3e-3)
    support_loss_weight: float = 0.0  # lambda_sup (MSR-VTT: 0.8)
    support_center: str = "upstream"  # upstream: v-bar = mean over the batch's texts; paper: the pair's own v
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.clip_arch not in CLIP_ARCHS:
            raise ValueError(f"--clip_arch must be one of {', '.join(CLIP_ARCHS)}, not {self.clip_arch!r}")
        if self.stochastic_prior not in PRIORS:
            raise ValueError(f"--stochastic_prior must be one of {', '.join(PRIORS)}, not {self.stochastic_prior!r}")
        if self.support_center not in SUPPORT_CENTERS:
            raise ValueError(f"--support_center must be one of {', '.join(SUPPORT_CENTERS)}, "
                             f"not {self.support_center!r}")
        if self.num_frames < 1:
            raise ValueError("--num_frames must be at least 1")
        if not 0.0 <= self.transformer_dropout < 1.0:
            raise ValueError("--transformer_dropout must be in [0, 1)")
