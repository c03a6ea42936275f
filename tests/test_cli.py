"""The command lines as a user meets them: each command's own flags with help, defaults and choices; no
abbreviations; a suggestion for a misspelled flag; an upstream command line's problems in one message; and
user errors as one line from rank 0, without a traceback."""
import dataclasses
import os
import subprocess
import sys

import pytest

from _procs import clean_env, free_port
from conftest import REPO
from tmass.cli import train_main
from tmass.config import SECTIONS, build_parser, parse_config
from tmass.errors import ConfigError


def help_of(mode):
    return build_parser("x", mode).format_help()


def test_every_flag_has_help_and_each_command_shows_its_own():
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"--{f.name} has no help text"
    train, evaluation = help_of("train"), help_of("eval")
    for flag in ("--train_shards", "--deepspeed_config", "--noclip_lr", "--stochastic_trials", "--shard_sampling"):
        assert flag in train
    for flag in ("--test_shards", "--checkpoint", "--load_epoch", "--random_init", "--stochastic_trials"):
        assert flag in evaluation
    assert "--test_shards" not in train and "--noclip_lr" not in evaluation and "--train_shards" not in evaluation
    assert "{per_text,per_pair}" in evaluation and "(default 20)" in evaluation  # choices and defaults


@pytest.mark.parametrize("argv, suggestion", [
    (["--stochastic_trial", "3"], "--stochastic_trials"),  # an abbreviation is not taken silently
    (["--num_epoch", "3"], "--num_epochs"),
    (["--noclip-lr", "1e-4"], "--noclip_lr"),
])
def test_a_misspelled_flag_gets_a_suggestion(argv, suggestion, capsys):
    with pytest.raises(ConfigError) as e:
        parse_config(argv, prog="launch/train.py", mode="train")
    assert e.value.exit_code == 2
    assert f"did you mean {suggestion}" in str(e.value) and len(str(e.value).strip().splitlines()) == 1
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tmass-train: unknown flag") and len(err.strip().splitlines()) == 1


UPSTREAM_TRAIN = ("--arch=clip_stochastic --exp_name=MSR-VTT-9k --videos_dir=data/MSRVTT/vids --batch_size=32 "
                  "--noclip_lr=3e-5 --transformer_dropout=0.3 --dataset_name=MSRVTT --msrvtt_train_file=9k "
                  "--stochasic_trials=20 --gpu=0 --num_epochs=5 --support_loss_weight=0.8").split()


def test_an_upstream_command_line_gets_every_problem_in_one_message():
    with pytest.raises(ConfigError) as e:
        parse_config(UPSTREAM_TRAIN, prog="launch/train.py", mode="train")
    message = str(e.value)
    for part in ("--videos_dir: tmass reads WebDataset shards", "--msrvtt_train_file: the train list",
                 "--deepspeed_config is required", "--train_shards is required"):
        assert part in message


def test_upstream_test_flags_run_with_a_note_on_what_evaluation_ignores(capsys):
    argv = [a for a in UPSTREAM_TRAIN if not a.startswith(("--videos_dir", "--msrvtt"))] + [
        "--load_epoch=-1", "--DSL", "--test_shards", "t.tar"]
    cfg = parse_config(argv, prog="launch/eval.py", mode="eval")
    assert cfg.eval.dsl and cfg.eval.load_epoch == -1 and cfg.eval.stochastic_trials == 20
    assert cfg.preset == "msrvtt" and cfg.train.exp_name == "MSR-VTT-9k"
    note = capsys.readouterr().err
    assert "--arch" in note and "--gpu" in note and "--noclip_lr" in note and "not used by launch/eval.py" in note


def test_user_errors_are_one_line_from_rank_0(synthetic_shards, tmp_path):
    """Two ranks evaluating a file that is not a checkpoint: one error line, no traceback, a non-zero exit."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(free_port()), os.path.join(REPO, "launch", "eval.py"), "--checkpoint",
           str(synthetic_shards / "test.json"), "--test_shards", str(synthetic_shards / "test-000000.tar"),
           "--num_workers", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                       env=clean_env(DS_ACCELERATOR="cpu", PYTHONPATH=REPO))
    out = p.stdout + p.stderr
    assert p.returncode != 0
    errors = [ln for ln in out.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "test.json is not a readable torch checkpoint" in errors[0], out[-3000:]
    assert "Traceback" not in out
    p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "eval.py"), "--test_shards",
                        str(tmp_path / "nope-{000000..000001}.tar"), "--random_init"], capture_output=True,
                       text=True, timeout=300, cwd=REPO, env=clean_env(PYTHONPATH=REPO))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: 2 of 2 test shard(s) missing, e.g. {tmp_path / 'nope-000000.tar'}; a subset would give other "
        f"numbers: fix --test_shards"]
