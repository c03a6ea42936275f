"""The T-MASS model: CLIP towers, text-conditioned pooling, similarity-aware radius.

    t = text_features(ids)       [N_t, D]      f = frame_features(video)   [N_v, F, D]
    psi(v_i | t_j)               [N_v, N_t, D] (pooling.py)
    R(t_j, v_i) = exp(W S + b)   [.., D]       (stochastic.py)
The module knows nothing of DeepSpeed: a distributed caller passes `gather` and the batch offset.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPModel

from ..config import ModelConfig
from .loss import Gather, tmass_loss
from .clip import (
    build_clip,
    compile_layers,
    compile_towers,
    enable_grad_checkpointing,
    frame_features,
    set_attention,
    text_features,
)
from .pooling import TextConditionedPool
from .stochastic import SimilarityRadius


class TMASS(nn.Module):
    def __init__(self, cfg: ModelConfig, clip: CLIPModel | None = None):
        super().__init__()
        self.cfg = cfg
        self.clip = clip if clip is not None else build_clip(cfg.clip_path, cfg.clip_arch)
        dim = self.clip.config.projection_dim
        self.pool_frames = TextConditionedPool(dim, cfg.transformer_dropout)
        self.radius = SimilarityRadius(cfg.num_frames, dim)
        set_attention(self.clip, cfg.attn_implementation)
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(self.clip)
        if cfg.compile:
            (compile_towers if cfg.compile_scope == "towers" else compile_layers)(self.clip)
        if cfg.deterministic_text:  # X-Pool: no text mass, so the radius has nothing to learn
            self.radius.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.clip.config.projection_dim

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return text_features(self.clip, input_ids, attention_mask)

    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        if video.shape[1] != self.cfg.num_frames:
            raise ValueError(f"video has {video.shape[1]} frames, the model {self.cfg.num_frames} (--num_frames)")
        return frame_features(self.clip, video)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        video: torch.Tensor,
        eps: torch.Tensor,
        offset: int = 0,
        gather: Gather | None = None,
        video_ids: torch.Tensor | None = None,
        dropout_stream: tuple | None = None,
    ) -> dict[str, torch.Tensor]:
        """The training loss of this process's pairs; `eps` [B, D] is the noise of the whole (global) batch;
        `video_ids` [B] enables multi-positive pairs; `dropout_stream` keys the pooling's dropout per pair."""
        t, f = self.encode_text(input_ids, attention_mask), self.encode_frames(video)
        return tmass_loss(
            self.pool_frames,
            self.radius,
            self.logit_scale,
            t,
            f,
            eps,
            offset=offset,
            gather=gather,
            support_weight=self.cfg.support_loss_weight,
            support_center=self.cfg.support_center,
            video_ids=video_ids,
            dropout_stream=dropout_stream,
        )
