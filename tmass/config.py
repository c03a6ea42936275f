"""Every option of tmass in one dataclass tree, and its command line.

    Config         seed: the weights, the data order and every noise stream
      model  ModelConfig   the network (docs/method.md), frames per video and the text mass included
      data   DataConfig    shards -> batches
      eval   EvalConfig    the sharded, leak-free evaluation
      train  TrainConfig   optimisation (the global batch), checkpoints, logs

Every setting has one owner, and every section is frozen: what follows the model (the frame size, a loaded
run's settings) is set by building a new Config (`Config.resolve`, `Config.replace`), never by writing
into one.

Flags are the field names (`--num_frames`, `--noclip_lr`, `--support_loss_weight`, ...), so upstream T-MASS
command lines carry over; `--stochasic_trials` (upstream's spelling) and `--DSL` are aliases. Defaults follow the
upstream code. Contradictions fail here, before any process starts, with a message
that names the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass, field

from .errors import ConfigError

CLIP_ARCHS = ("ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14-336", "small", "tiny")
PRIORS = ("uniform01", "normal")
SUPPORT_CENTERS = ("upstream", "paper")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
COMPILE_SCOPES = ("layers", "towers")
ADAMW = ("auto", "fused", "foreach")
TRAIN, EVAL, BOTH = "train", "eval", "both"  # which command line shows a flag
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics (pixels in [0, 1])
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def opt(default: typing.Any, help: str, use: str = BOTH, choices: tuple | None = None) -> typing.Any:
    """A config field with its flag's help text, the command lines that show it, and its choices."""
    return field(default=default, metadata={"help": help, "use": use, "choices": choices})


def channel_triple(text: str, name: str, positive: bool = False) -> tuple[float, float, float]:
    """'R,G,B' -> three finite floats (all > 0 if positive); anything else is a ConfigError naming the fix."""
    import math

    try:
        values = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        kind = "three positive numbers" if positive else "three numbers"
        raise ConfigError(f"{name} {text!r}: give {kind} 'R,G,B', e.g. {name} 0.5,0.5,0.5")
    return values


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_choices(obj) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise ConfigError(f"--{f.name} must be one of {', '.join(map(str, choices))}, not {getattr(obj, f.name)!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The network (docs/method.md)."""

    clip_arch: str = opt(
        "ViT-B/32",
        "CLIP architecture of random weights (without --clip_path); small and tiny "
        "are the demo's and the tests' small random CLIPs",
        choices=CLIP_ARCHS,
    )
    clip_path: str | None = opt(
        None,
        "a local HF CLIP checkpoint directory, or a hub name already in the HF "
        "cache (openai/clip-vit-base-patch16); none: random weights of --clip_arch",
    )
    num_frames: int = opt(12, "frames sampled per video")
    transformer_dropout: float = opt(0.3, "dropout of the pooling's residual branch", use=TRAIN)
    stochastic_prior: str = opt("uniform01", "distribution of the text mass's noise eps", choices=PRIORS)
    stochastic_prior_std: float = opt(1.0, "std of the normal prior (LSMDC: 3e-3)")
    support_loss_weight: float = opt(0.0, "lambda_sup, weight of the support-text loss (MSR-VTT: 0.8)", use=TRAIN)
    support_center: str = opt(
        "upstream",
        "the support text's centre: upstream (the video pooled with every text "
        "of the batch, averaged) or paper (with its own text)",
        use=TRAIN,
        choices=SUPPORT_CENTERS,
    )
    grad_checkpointing: bool = opt(False, "activation checkpointing of both CLIP towers (less memory)", use=TRAIN)
    compile: bool = opt(False, "torch.compile the CLIP towers (what --compile_scope names)", use=TRAIN)
    compile_scope: str = opt(
        "layers",
        "what --compile compiles: layers (each encoder layer; one graph serves a tower's layers) or towers "
        "(each whole tower, one graph)",
        use=TRAIN,
        choices=COMPILE_SCOPES,
    )
    attn_implementation: str = opt(
        "sdpa",
        "attention of both CLIP towers: sdpa (torch's scaled_dot_product_attention: flash or memory-efficient "
        "kernels on GPUs), eager (HF's matmul and softmax), or flash_attention_2 (needs the flash-attn package)",
        choices=ATTENTION,
    )
    deterministic_text: bool = opt(
        False,
        "the X-Pool baseline: train and score with t alone, no text mass; "
        "in evaluation, also scores a T-MASS model without its text mass",
    )
    image_mean: str | None = opt(
        None,
        "the frames' mean per channel, 'R,G,B' for pixels in [0, 1]; default: the CLIP's own "
        "(--clip_path's preprocessor_config.json, else OpenAI CLIP's)",
    )
    image_std: str | None = opt(None, "the frames' std per channel, 'R,G,B'; default: the CLIP's own, as --image_mean")

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(
            [
                (self.num_frames >= 1, "--num_frames must be at least 1"),
                (0.0 <= self.transformer_dropout < 1.0, "--transformer_dropout must be in [0, 1)"),
            ]
        )
        self.pixel_stats()  # a malformed --image_mean / --image_std fails here

    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel of the frames' normalisation, x -> (x / 255 - mean) / std: the settings', else
        OpenAI CLIP's (training fixes the CLIP's own into its run's config: tmass.model.clip.pixel_stats_of)."""
        mean = channel_triple(self.image_mean, "--image_mean") if self.image_mean else OPENAI_CLIP_MEAN
        std = channel_triple(self.image_std, "--image_std", positive=True) if self.image_std else OPENAI_CLIP_STD
        return mean, std


@dataclass(frozen=True)
class DataConfig:
    """Shards -> batches (the frames per video are the model's --num_frames)."""

    video_sample_type: str = opt(
        "uniform", "which frames: the middle of each segment, or a random one", choices=("uniform", "rand")
    )
    input_res: int = opt(224, "frame size; follows the CLIP's image size unless given")
    crop_scale_min: float = opt(0.5, "RandomResizedCrop's smallest area fraction in training", use=TRAIN)
    hflip_prob: float = opt(0.5, "probability of a horizontal flip of a training clip", use=TRAIN)
    num_workers: int = opt(2, "data loader worker processes per rank")
    caption_sampling: str = opt(
        "random",
        "a random caption each time a video is seen, or one sample per (video, caption) pair as upstream",
        use=TRAIN,
        choices=("random", "pairs"),
    )
    shard_sampling: str = opt(
        "resampled",
        "shards drawn with replacement, or shuffled: every sample once per epoch",
        use=TRAIN,
        choices=("resampled", "shuffled"),
    )
    shuffle_buffer: int = opt(1000, "samples in the shuffle buffer (0 or 1: none)", use=TRAIN)
    shuffle_initial: int = opt(100, "samples buffered before the first one leaves", use=TRAIN)
    decode_timeout: float = opt(10.0, "seconds before a hanging decode is abandoned (0: no watchdog)")
    max_bad_fraction: float = opt(0.05, "stop when more than this fraction of samples is skipped as bad")
    stall_skips: int = opt(2000, "stop a training stream after this many skipped samples in a row (0: off)", use=TRAIN)
    stall_seconds: float = opt(
        600.0, "stop a training stream that gets no good sample for this long (0: off)", use=TRAIN
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(
            [
                (self.num_workers >= 0, "--num_workers must be 0 or more"),
                (0 <= self.max_bad_fraction <= 1, "--max_bad_fraction must be in [0, 1]"),
                (
                    self.stall_skips >= 0 and self.stall_seconds >= 0,
                    "--stall_skips and --stall_seconds must be 0 (off) or more",
                ),
            ]
        )


@dataclass(frozen=True)
class EvalConfig:
    """The sharded, leak-free evaluation (and validation during training)."""

    test_shards: str | None = opt(
        None,
        "the test split's shards: a wildcard ('shards/msrvtt/test-*.tar': every "
        "shard it matches) or webdataset URLs ('test-{000000..000004}.tar')",
        use=EVAL,
    )
    checkpoint: str | None = opt(None, "a training run directory, an exported directory, or an upstream .pth", use=EVAL)
    load_epoch: int | None = opt(
        None, "upstream's: with --exp_name, -1 its best checkpoint, N the end of epoch N", use=EVAL
    )
    random_init: bool = opt(False, "evaluate a randomly initialised model on purpose (no checkpoint)", use=EVAL)
    tokenizer: str | None = opt(
        None, "tokenizer directory (default: the run's, --clip_path's, or the shards' tokenizer/)"
    )
    stochastic_trials: int = opt(20, "M, stochastic texts tried per (text, video) pair (alias --stochasic_trials)")
    trial_noise: str = opt(
        "per_text",
        "per_text: one noise draw per (text, trial), shared by all videos; "
        "per_pair: one per (text, video, trial), as upstream",
        choices=("per_text", "per_pair"),
    )
    eval_chunk: int = opt(8192, "(text, video) pairs scored at once: bounds memory")
    eval_compile: str = opt(
        "auto", "torch.compile the per_pair scorer (auto: from 10^5 pairs)", choices=("auto", "yes", "no")
    )
    eval_protocol: str = opt(
        "leakfree",
        "leakfree, or upstream: the leaky score of the upstream code, only to compare with published numbers",
        choices=("leakfree", "upstream"),
    )
    dsl: bool = opt(False, "dual softmax over the queries (transductive; alias --DSL)")
    save_sims: str | None = opt(None, "write the full [N_t, N_v] score matrix to this .npy", use=EVAL)
    eval_batch_size: int = opt(32, "videos per encoding batch")
    results: str | None = opt(None, "the results JSON (default: eval_results.json in the run or export dir)", use=EVAL)
    tensorboard_dir: str | None = opt(None, "also write the test metrics to this TensorBoard folder", use=EVAL)

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(
            [
                (self.stochastic_trials >= 1, "--stochastic_trials must be at least 1"),
                (self.eval_chunk >= 1, "--eval_chunk must be at least 1"),
            ]
        )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, checkpoints, logs."""

    train_shards: str | None = opt(
        None,
        "the training split's shards: a quoted wildcard "
        "('shards/msrvtt/train-*.tar') or webdataset URLs (build them with "
        "tmass-build-shards)",
        use=TRAIN,
    )
    val_shards: str | None = opt(
        None, "URLs of the validation split: selects the best checkpoint (never the test split)", use=TRAIN
    )
    train_num_samples: int | None = opt(
        None, "samples per epoch, for shards without a manifest (pipe: URLs)", use=TRAIN
    )
    deepspeed_config: str | None = opt(
        None, "a ds_configs/*.json: batch, accumulation, clipping, precision, ZeRO", use=TRAIN
    )
    output_dir: str = opt("./outputs", "where runs live: {output_dir}/{exp_name}")
    exp_name: str = opt("tmass", "the run's name; relaunching the same name resumes it")
    global_batch_size: int = opt(
        32,
        "pairs per optimiser step over all ranks (alias --batch_size, upstream's "
        "name); a number in the DeepSpeed JSON's train_batch_size must agree. Each "
        "rank's micro batch is global / (ranks x gradient_accumulation_steps)",
        use=TRAIN,
    )
    num_epochs: int = opt(5, "epochs", use=TRAIN)
    max_steps: int | None = opt(None, "stop after this many optimiser steps", use=TRAIN)
    clip_lr: float = opt(1e-6, "learning rate of the CLIP towers", use=TRAIN)
    noclip_lr: float = opt(1e-5, "learning rate of the pooling and the radius", use=TRAIN)
    weight_decay: float = opt(0.2, "AdamW's weight decay", use=TRAIN)
    warmup_proportion: float = opt(0.1, "fraction of the steps of linear warm-up, then cosine to 0", use=TRAIN)
    adamw: str = opt(
        "auto",
        "AdamW's implementation: fused (one kernel for every parameter), foreach (batched per group), or auto "
        "(fused on CUDA, torch's default on CPUs); a DeepSpeed JSON that names its own optimizer keeps it",
        use=TRAIN,
        choices=ADAMW,
    )
    no_decay_norm_bias: bool = opt(False, "no weight decay on norms, biases and logit_scale", use=TRAIN)
    multi_positive: bool = opt(False, "pairs of the same video in a global batch count as positives", use=TRAIN)
    log_step: int = opt(10, "log every N optimiser steps", use=TRAIN)
    save_every_steps: int = opt(500, "checkpoint every N steps (and at every epoch's end)", use=TRAIN)
    keep_last: int = opt(3, "step checkpoints kept (best is kept apart)", use=TRAIN)
    evals_per_epoch: int = opt(1, "validations per epoch on --val_shards", use=TRAIN)
    log_samples: bool = opt(False, "append every step's keys and captions to samples-rank{r}.jsonl", use=TRAIN)
    allow_config_change: bool = opt(
        False, "resume a run although settings that change it differ from its config.json", use=TRAIN
    )
    verbose: bool = opt(False, "show DeepSpeed's INFO lines and library warnings")
    local_rank: int = opt(-1, "(set by the deepspeed launcher)")

    def __post_init__(self) -> None:
        _check(
            [
                (self.global_batch_size >= 1, "--global_batch_size (--batch_size) must be at least 1"),
                (self.num_epochs >= 1, "--num_epochs must be at least 1"),
                (0 <= self.warmup_proportion < 1, "--warmup_proportion must be in [0, 1)"),
                (self.keep_last >= 1, "--keep_last must be at least 1"),
                (self.log_step >= 1, "--log_step must be at least 1 (log every N optimiser steps)"),
                (self.evals_per_epoch >= 1, "--evals_per_epoch must be at least 1"),
                (self.save_every_steps >= 1, "--save_every_steps must be at least 1"),
            ]
        )


@dataclass(frozen=True)
class Config:
    seed: int = opt(24, "seeds the weights, the data order and every noise stream")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str | None = None
    explicit: frozenset = frozenset()  # the flags given on the command line (not saved)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "explicit"}

    def replace(self, **sections) -> "Config":
        """A new Config with whole sections or fields of a section replaced: replace(model=m),
        replace(eval={"dsl": True}), replace(seed=3)."""
        new = {k: dataclasses.replace(getattr(self, k), **v) if isinstance(v, dict) else v for k, v in sections.items()}
        return dataclasses.replace(self, **new)

    def check_model(self, loaded: "ModelConfig", source: str) -> None:
        """A checkpoint carries its own architecture; an architecture flag given explicitly must agree with it."""
        wrong = [
            f"--{k} {getattr(self.model, k)} (the checkpoint has {getattr(loaded, k)})"
            for k in ("clip_arch", "num_frames")
            if k in self.explicit and getattr(self.model, k) != getattr(loaded, k)
        ]
        if wrong:
            raise ConfigError(
                f"{source} does not match the flags: {'; '.join(wrong)}. Drop those flags "
                f"or pass the checkpoint's values."
            )

    def resolve(self, image_size: int, source: str) -> "Config":
        """The config a run uses, once the CLIP is known: frames at its image size, taken from it unless
        --input_res is given, and then it must agree."""
        if "input_res" in self.explicit and self.data.input_res != image_size:
            raise ConfigError(
                f"--input_res {self.data.input_res}, but {source} takes {image_size} x {image_size} "
                f"frames; drop --input_res or pass {image_size}"
            )
        return self.replace(data={"input_res": image_size})

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(
            **{name: SECTIONS[name](**d[name]) for name in SECTIONS},
            preset=d.get("preset"),
            **{name: d[name] for name in TOP if name in d},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig, "train": TrainConfig}
TOP = ("seed",)  # the settings of Config itself, beside its sections
ALIASES = {
    "stochasic_trials": "stochastic_trials",
    "DSL": "dsl",
    "num_frame": "num_frames",
    "batch_size": "global_batch_size",
}

# Per-dataset values of the upstream README.
PRESETS: dict[str, dict[str, typing.Any]] = {
    "msrvtt": {
        "noclip_lr": 3e-5,
        "transformer_dropout": 0.3,
        "support_loss_weight": 0.8,
        "num_epochs": 5,
        "stochastic_trials": 20,
    },
    "lsmdc": {
        "noclip_lr": 1e-5,
        "transformer_dropout": 0.3,
        "stochastic_prior": "normal",
        "stochastic_prior_std": 3e-3,
        "num_epochs": 5,
        "stochastic_trials": 20,
    },
    "didemo": {"noclip_lr": 1e-5, "transformer_dropout": 0.4, "num_epochs": 5, "stochastic_trials": 20},
    "demo": {
        "clip_arch": "tiny",
        "num_frames": 8,
        "input_res": 32,
        "noclip_lr": 1e-3,
        "clip_lr": 1e-4,
        "transformer_dropout": 0.1,
        "num_epochs": 3,
        "stochastic_trials": 8,
        "weight_decay": 0.01,
        "hflip_prob": 0.0,
        "crop_scale_min": 0.8,
        "support_loss_weight": 0.0,
        "num_workers": 1,
        "decode_timeout": 30.0,
        "shuffle_buffer": 200,
    },
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
    "eval_window_size": "the best checkpoint is chosen by validation R@1",
    "save_every": "use --save_every_steps",
    "skip_eval": "",
    "embed_dim": "it comes from the CLIP checkpoint",
    "num_mha_heads": "the pooling has one head, as upstream",
    "pooling_type": "",
    "loss": "",
    "k": "",
    "attention_temperature": "",
    "chunk_size": "",
    "batch_size_split": "",
}
UPSTREAM_ERRORS = {
    "videos_dir": "tmass reads WebDataset shards: build them once with `tmass-build-shards --source msrvtt "
    "--anno_dir ANNS --videos_dir DIR --out SHARDS`, then pass --train_shards/--val_shards/"
    "--test_shards",
    "msrvtt_train_file": "the train list is chosen when the shards are built (tmass-build-shards "
    "--msrvtt_train_file 9k|7k)",
}


def _class_of(name: str) -> type:
    """The dataclass that owns setting `name`: a section, or Config itself for TOP."""
    return SECTIONS.get(_owner[name], Config)


def _type_of(f: dataclasses.Field):
    hint = typing.get_type_hints(_class_of(f.name))[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


_owner = {f.name: sec for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)} | {n: None for n in TOP}
REQUIRED = {
    TRAIN: {
        "deepspeed_config": "e.g. ds_configs/zero2_bf16.json on GPUs, ds_configs/cpu_fp32.json on CPUs",
        "train_shards": "the shards of the training split (tmass-build-shards writes them)",
    },
    EVAL: {"test_shards": "the shards of the test split (tmass-build-shards writes them)"},
}


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations, whose unknown-flag error suggests the nearest flags."""

    def error(self, message: str) -> typing.NoReturn:
        import difflib

        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = []
            for arg in message.split(":", 1)[1].split():
                if arg.startswith("--"):
                    near = difflib.get_close_matches(arg.split("=")[0], known, n=2, cutoff=0.6)
                    hints.append(f"{arg}" + (f" (did you mean {' or '.join(near)}?)" if near else ""))
            if hints:
                message = f"unknown flag(s): {', '.join(hints)}; `{self.prog} --help` lists them"
        raise ConfigError(f"{self.prog}: {message}")


DESCRIPTIONS = {
    TRAIN: "Train T-MASS with DeepSpeed (relaunching the same command resumes the run). Run it under deepspeed, "
    "torchrun, srun or plain python.",
    EVAL: "Evaluate a trained T-MASS on test shards: the sharded, leak-free stochastic evaluation, t2v and v2t.",
    BOTH: __doc__,
}
METAVARS = {int: "N", float: "X", str: "S"}


def add_flag(g: argparse._ActionsContainer, f: dataclasses.Field, shown: bool = True) -> None:
    """Add setting `f`'s flag (its aliases, help, default, type and choices) to parser or group `g`; a flag not
    shown is accepted without help."""
    names = [f"--{f.name}"] + [f"--{a}" for a, t in ALIASES.items() if t == f.name]
    default = f.default if f.default is not dataclasses.MISSING else None
    text = f.metadata.get("help", "")
    if default not in (None, False, ""):
        text += f" (default {default})"
    kw = {"help": text if shown else argparse.SUPPRESS, "dest": f.name}
    kind = _type_of(f)
    if kind is bool:
        g.add_argument(*names, action="store_true", **kw)
    else:
        choices = f.metadata.get("choices")
        g.add_argument(*names, type=kind, metavar=None if choices else METAVARS.get(kind, "S"), choices=choices, **kw)


def add_flags(g: argparse._ActionsContainer, names: typing.Iterable[str]) -> None:
    """The flags of the named settings, for a command with a parser of its own (tmass-index, tmass-search): one
    definition of each setting, wherever it is asked for. The parser needs argument_default=SUPPRESS."""
    for name in names:
        add_flag(g, _field(name))


def config_of(values: dict) -> Config:
    """The Config of setting values by name over the defaults, those given explicit, e.g.
    config_of({"checkpoint": "runs/a", "seed": 3})."""
    return _built(_placed({}, values), None, frozenset(values))


def _placed(base: dict, values: dict) -> dict:
    """base ({section: {name: value}} and TOP names) with each of `values` placed in its section."""
    out = {k: dict(v) if k in SECTIONS else v for k, v in base.items() if k in SECTIONS or k in TOP}
    for name, value in values.items():
        if _owner[name] is None:
            out[name] = value
        else:
            out.setdefault(_owner[name], {})[name] = value
    return out


def _built(base: dict, preset: str | None, explicit: frozenset) -> Config:
    try:
        return Config(
            **{sec: cls(**base.get(sec, {})) for sec, cls in SECTIONS.items()},
            preset=preset,
            explicit=explicit,
            **{name: base[name] for name in TOP if name in base},
        )
    except ConfigError:
        raise
    except ValueError as e:  # a value of the wrong kind in a --config JSON
        raise ConfigError(f"{e}") from None


def build_parser(prog: str, mode: str = BOTH) -> argparse.ArgumentParser:
    """The flags of `mode` (train: launch/train.py, eval: launch/eval.py), grouped by section, with help,
    defaults and choices. The other command's flags are accepted without help, so that an upstream command
    line (which passes training flags to test.py) runs; parse_config notes the ignored ones."""
    p = Parser(
        prog=prog,
        description=DESCRIPTIONS[mode],
        usage="%(prog)s [--flag VALUE ...]",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="per-dataset values of the upstream README")
    p.add_argument("--dataset_name", choices=sorted(DATASET_NAMES), help="upstream's flag: the same as --preset")
    p.add_argument("--config", help="a resolved config JSON (a run writes one beside its checkpoints)")
    groups = [("run", "The whole run.", [f for f in dataclasses.fields(Config) if f.name in TOP])]
    groups += [(sec, (cls.__doc__ or "").strip(), dataclasses.fields(cls)) for sec, cls in SECTIONS.items()]
    for sec, doc, fields in groups:
        g = p.add_argument_group(sec, doc)
        for f in fields:
            add_flag(g, f, shown=mode == BOTH or f.metadata.get("use", BOTH) in (BOTH, mode))
    for name in list(UPSTREAM_NOOPS) + list(UPSTREAM_ERRORS):
        p.add_argument(f"--{name}", dest=f"upstream_{name}", help=argparse.SUPPRESS)
    return p


def parse_config(argv: list[str] | None = None, prog: str = "tmass", mode: str = BOTH) -> Config:
    """Defaults < --config JSON < --preset < explicit flags. Raises ConfigError with the fix on bad input: every
    upstream flag that has no meaning here and every missing required flag, in one message."""
    args = vars(build_parser(prog, mode).parse_args(argv))
    problems = [f"--{name}: {fix}" for name, fix in UPSTREAM_ERRORS.items() if f"upstream_{name}" in args]
    notes = [
        f"--{name} ({note})" if note else f"--{name}"
        for name, note in UPSTREAM_NOOPS.items()
        if args.pop(f"upstream_{name}", None) is not None
    ]
    for name in UPSTREAM_ERRORS:
        args.pop(f"upstream_{name}", None)
    if mode != BOTH:
        other = sorted(n for n in args if n in _owner and _field(n).metadata.get("use", BOTH) not in (BOTH, mode))
        if other:
            notes.append(f"{', '.join('--' + n for n in other)} (not used by {prog})")
    base: dict = {sec: {} for sec in SECTIONS}
    if "config" in args:
        with open(args.pop("config")) as f:
            base = {k: v for k, v in json.load(f).items() if k in SECTIONS or k in TOP}
    preset = args.pop("preset", None) or DATASET_NAMES.get(args.pop("dataset_name", None) or "")
    values = dict(PRESETS.get(preset, {})) if preset else {}
    values.update(args)
    base = _placed(base, values)
    if mode != BOTH:  # after --config, which may carry them
        problems += [
            f"--{name} is required: {what}"
            for name, what in REQUIRED[mode].items()
            if base.get(_owner[name], {}).get(name) is None
        ]
    if problems:
        raise ConfigError(f"{prog}: " + "; ".join(problems))
    if notes and os.environ.get("RANK", "0") == "0":
        print(f"note: ignored: {'; '.join(notes)}", file=sys.stderr)
    return _built(base, preset, frozenset(args))


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(_class_of(name)) if f.name == name)
