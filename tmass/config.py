"""Every option of tmass in one dataclass tree, and its command line.

    Config
      model  ModelConfig   the network (method notes a)
      data   DataConfig    shards -> batches
      eval   EvalConfig    the sharded, leak-free evaluation
      train  TrainConfig   optimisation, checkpoints, logs

Flags are the field names (`--num_frames`, `--noclip_lr`, `--support_loss_weight`, ...), so upstream T-MASS
command lines carry over; `--stochasic_trials` (upstream's spelling) and `--DSL` are aliases. Defaults follow the
upstream code (method notes, section c). Contradictions fail here, before any process starts, with a message
that names the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field

CLIP_ARCHS = ("ViT-B/32", "ViT-B/16", "small", "tiny")
PRIORS = ("uniform01", "normal")
SUPPORT_CENTERS = ("upstream", "paper")


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass
class ModelConfig:
    clip_arch: str = "ViT-B/32"  # ViT-B/32, ViT-B/16; small (the demo's) or tiny (the tests'): random CLIPs
    clip_path: str | None = None  # a local HF CLIP checkpoint directory; none: random weights of clip_arch
    num_frames: int = 12
    transformer_dropout: float = 0.3
    stochastic_prior: str = "uniform01"  # upstream default; or normal
    stochastic_prior_std: float = 1.0  # std of the normal prior (LSMDC: 3e-3)
    support_loss_weight: float = 0.0  # lambda_sup (MSR-VTT: 0.8)
    support_center: str = "upstream"  # upstream: v-bar = mean over the batch's texts; paper: the pair's own v
    grad_checkpointing: bool = False  # activation checkpointing of both CLIP towers
    compile: bool = False  # torch.compile each CLIP encoder layer in place (ZeRO stages 0-2)
    deterministic_text: bool = False  # the X-Pool baseline: train and score with t alone (no text mass)

    def __post_init__(self) -> None:
        _check([(self.clip_arch in CLIP_ARCHS,
                 f"--clip_arch must be one of {', '.join(CLIP_ARCHS)}, not {self.clip_arch!r}"),
                (self.stochastic_prior in PRIORS, f"--stochastic_prior must be one of {', '.join(PRIORS)}, "
                                                  f"not {self.stochastic_prior!r}"),
                (self.support_center in SUPPORT_CENTERS, f"--support_center must be one of "
                                                         f"{', '.join(SUPPORT_CENTERS)}, not {self.support_center!r}"),
                (self.num_frames >= 1, "--num_frames must be at least 1"),
                (0.0 <= self.transformer_dropout < 1.0, "--transformer_dropout must be in [0, 1)")])


@dataclass
class DataConfig:
    num_frames: int = 12  # set from the model's
    video_sample_type: str = "uniform"  # upstream's default for train and test; or rand
    input_res: int = 224
    crop_scale_min: float = 0.5  # RandomResizedCrop's smallest area fraction in training
    hflip_prob: float = 0.5  # horizontal flips in training (upstream's; they swap left and right)
    batch_size: int = 32  # per rank in the streams; the global batch in TrainConfig (from the DeepSpeed JSON)
    num_workers: int = 2  # loader workers per rank
    caption_sampling: str = "random"  # a random caption each time a video is seen; or pairs (upstream)
    shard_sampling: str = "resampled"  # with replacement; or shuffled (a permutation of the shards per epoch)
    shuffle_buffer: int = 1000  # raw samples, before decoding (0 or 1: no shuffle buffer)
    shuffle_initial: int = 100
    decode_timeout: float = 10.0  # seconds; 0 disables the watchdog
    max_bad_fraction: float = 0.05
    seed: int = 24

    def __post_init__(self) -> None:
        _check([(self.video_sample_type in ("uniform", "rand"), "--video_sample_type must be uniform or rand"),
                (self.caption_sampling in ("random", "pairs"), "--caption_sampling must be random or pairs"),
                (self.shard_sampling in ("resampled", "shuffled"), "--shard_sampling must be resampled or shuffled"),
                (self.num_frames >= 1, "--num_frames must be at least 1"),
                (self.batch_size >= 1, "--batch_size must be at least 1"),
                (self.num_workers >= 0, "--num_workers must be 0 or more"),
                (0 <= self.max_bad_fraction <= 1, "--max_bad_fraction must be in [0, 1]")])


@dataclass
class EvalConfig:
    test_shards: str | None = None  # webdataset URLs of the test split
    checkpoint: str | None = None  # a training output dir / DeepSpeed checkpoint, an exported dir, or upstream .pth
    tokenizer: str | None = None  # default: --clip_path, else the shards' tokenizer/ folder
    stochastic_trials: int = 20  # M (upstream spells the flag --stochasic_trials; both work)
    trial_noise: str = "per_text"  # per_text: common random numbers per (text, trial); per_pair: as upstream
    eval_chunk: int = 8192  # (text, video) pairs scored at once: bounds memory (8192 was fastest on 2 cores)
    eval_compile: str = "auto"  # torch.compile the per_pair scorer: yes, no, or auto (yes from 10^5 pairs)
    eval_protocol: str = "leakfree"  # or upstream: the candidate pooled with its own caption (leaky)
    deterministic_text: bool = False  # score with t alone (the X-Pool baseline)
    dsl: bool = False  # dual softmax over the queries (transductive)
    save_sims: str | None = None  # write the full [N_t, N_v] score matrix here (.npy); nothing else holds it
    eval_batch_size: int = 32  # videos per encoding batch
    results: str | None = None  # the results JSON (default: beside the checkpoint, or ./eval_results.json)
    tensorboard_dir: str | None = None

    def __post_init__(self) -> None:
        _check([(self.trial_noise in ("per_text", "per_pair"), "--trial_noise must be per_text or per_pair"),
                (self.eval_protocol in ("leakfree", "upstream"), "--eval_protocol must be leakfree or upstream"),
                (self.stochastic_trials >= 1, "--stochastic_trials must be at least 1"),
                (self.eval_chunk >= 1, "--eval_chunk must be at least 1"),
                (self.eval_compile in ("auto", "yes", "no"), "--eval_compile must be auto, yes or no")])


@dataclass
class TrainConfig:
    train_shards: str | None = None
    val_shards: str | None = None  # model selection uses these, never the test split
    train_num_samples: int | None = None  # needed only for shards without a manifest (e.g. pipe: URLs)
    deepspeed_config: str | None = None  # ds_configs/*.json: batch, accumulation, clipping, precision
    output_dir: str = "./outputs"
    exp_name: str = "tmass"
    num_epochs: int = 5
    max_steps: int | None = None  # stop after this many optimiser steps (demo, smoke tests)
    clip_lr: float = 1e-6
    noclip_lr: float = 1e-5
    weight_decay: float = 0.2
    warmup_proportion: float = 0.1
    no_decay_norm_bias: bool = False  # exclude norms, biases and logit_scale from weight decay
    multi_positive: bool = False  # pairs of the same video in a global batch count as positives
    log_step: int = 10
    save_every_steps: int = 500
    keep_last: int = 3
    evals_per_epoch: int = 1  # validations per epoch on --val_shards
    log_samples: bool = False  # append the keys and captions of every step to samples-rank{r}.jsonl (audits)
    local_rank: int = -1  # set by the deepspeed launcher

    def __post_init__(self) -> None:
        _check([(self.num_epochs >= 1, "--num_epochs must be at least 1"),
                (0 <= self.warmup_proportion < 1, "--warmup_proportion must be in [0, 1)"),
                (self.keep_last >= 1, "--keep_last must be at least 1"),
                (self.save_every_steps >= 1, "--save_every_steps must be at least 1")])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str | None = None
    explicit: frozenset = frozenset()  # the flags given on the command line (not saved)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "explicit"}

    def check_model(self, loaded: "ModelConfig", source: str) -> None:
        """A checkpoint carries its own architecture; an architecture flag given explicitly must agree with it."""
        wrong = [f"--{k} {getattr(self.model, k)} (the checkpoint has {getattr(loaded, k)})"
                 for k in ("clip_arch", "num_frames")
                 if k in self.explicit and getattr(self.model, k) != getattr(loaded, k)]
        if wrong:
            raise SystemExit(f"error: {source} does not match the flags: {'; '.join(wrong)}. Drop those flags "
                             f"or pass the checkpoint's values.")

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(**{name: SECTIONS[name](**d[name]) for name in SECTIONS}, preset=d.get("preset"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig, "train": TrainConfig}
ALIASES = {"stochasic_trials": "stochastic_trials", "DSL": "dsl", "num_frame": "num_frames"}
SHARED = {"num_frames": ("model", "data"), "deterministic_text": ("model", "eval")}  # one flag, several sections

# Per-dataset values of the upstream README (method notes c.2).
PRESETS: dict[str, dict[str, typing.Any]] = {
    "msrvtt": {"noclip_lr": 3e-5, "transformer_dropout": 0.3, "support_loss_weight": 0.8, "num_epochs": 5,
               "stochastic_trials": 20},
    "lsmdc": {"noclip_lr": 1e-5, "transformer_dropout": 0.3, "stochastic_prior": "normal",
              "stochastic_prior_std": 3e-3, "num_epochs": 5, "stochastic_trials": 20},
    "didemo": {"noclip_lr": 1e-5, "transformer_dropout": 0.4, "num_epochs": 5, "stochastic_trials": 20},
    "demo": {"clip_arch": "tiny", "num_frames": 8, "input_res": 32, "noclip_lr": 1e-3, "clip_lr": 1e-4,
             "transformer_dropout": 0.1, "num_epochs": 3, "stochastic_trials": 8, "weight_decay": 0.01,
             "hflip_prob": 0.0, "crop_scale_min": 0.8,
             "support_loss_weight": 0.0, "num_workers": 1, "decode_timeout": 30.0, "shuffle_buffer": 200},
}
DATASET_NAMES = {"MSRVTT": "msrvtt", "LSMDC": "lsmdc", "DiDeMo": "didemo"}

# Upstream flags with no job here: accepted, with what replaces them.
UPSTREAM_NOOPS = {
    "gpu": "devices come from the launcher (deepspeed --num_gpus / --include, CUDA_VISIBLE_DEVICES)",
    "arch": "tmass has one architecture (upstream's clip_stochastic)",
    "datetime": "runs live in --output_dir/--exp_name and resume automatically",
    "metric": "t2v and v2t are both computed",
    "save_memory_mode": "evaluation memory is bounded by --eval_chunk",
    "raw_video": "videos come from shards",
    "load_epoch": "pass --checkpoint",
    "eval_window_size": "the best checkpoint is chosen by validation R@1",
    "save_every": "use --save_every_steps",
    "skip_eval": "",
    "embed_dim": "it comes from the CLIP checkpoint",
    "num_mha_heads": "the pooling has one head, as upstream",
    "pooling_type": "", "loss": "", "k": "", "attention_temperature": "", "chunk_size": "",
    "batch_size_split": "",
}
UPSTREAM_ERRORS = {
    "videos_dir": "tmass reads WebDataset shards: build them with `python shards/build.py --source ... "
                  "--videos_dir DIR --out SHARDS`, then pass --train_shards/--val_shards/--test_shards",
    "msrvtt_train_file": "choose the split when building shards (shards/build.py --msrvtt_train_file 9k|7k)",
}


def _type_of(f: dataclasses.Field):
    hint = typing.get_type_hints(SECTIONS[_owner[f.name]])[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


_owner = {f.name: sec for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
_owner.update(num_frames="model", deterministic_text="model")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(PRESETS), help="per-dataset values of the upstream README")
    p.add_argument("--dataset_name", choices=sorted(DATASET_NAMES), help="upstream's flag: the same as --preset")
    p.add_argument("--config", help="a resolved config JSON (a run writes one beside its checkpoints)")
    seen = set()
    for sec, cls in SECTIONS.items():
        g = p.add_argument_group(sec)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            names = [f"--{f.name}"] + [f"--{a}" for a, t in ALIASES.items() if t == f.name]
            kind = _type_of(f)
            if kind is bool:
                g.add_argument(*names, dest=f.name, action="store_true")
            else:
                g.add_argument(*names, dest=f.name, type=kind, metavar=f.name.upper())
    for name in UPSTREAM_NOOPS:
        p.add_argument(f"--{name}", dest=f"noop_{name}", help=argparse.SUPPRESS)
    for name in UPSTREAM_ERRORS:
        p.add_argument(f"--{name}", dest=f"error_{name}", help=argparse.SUPPRESS)
    return p


def parse_config(argv: list[str] | None = None, prog: str = "tmass") -> Config:
    """Defaults < --config JSON < --preset < explicit flags. Raises SystemExit with the fix on bad input."""
    args = vars(build_parser(prog).parse_args(argv))
    for name, fix in UPSTREAM_ERRORS.items():
        if f"error_{name}" in args:
            raise SystemExit(f"error: --{name} has no meaning here: {fix}")
    for name, note in UPSTREAM_NOOPS.items():
        if args.pop(f"noop_{name}", None) is not None and note:
            print(f"note: --{name} is ignored: {note}", file=sys.stderr)
    base = {sec: {} for sec in SECTIONS}
    if "config" in args:
        with open(args.pop("config")) as f:
            base = {k: v for k, v in json.load(f).items() if k in SECTIONS}
    preset = args.pop("preset", None) or DATASET_NAMES.get(args.pop("dataset_name", None) or "")
    values = dict(PRESETS.get(preset, {})) if preset else {}
    values.update(args)
    for name, value in values.items():
        for sec in SHARED.get(name, (_owner[name],)):
            base.setdefault(sec, {})[name] = value
    try:
        return Config(**{sec: cls(**base.get(sec, {})) for sec, cls in SECTIONS.items()}, preset=preset,
                      explicit=frozenset(args))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
