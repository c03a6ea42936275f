"""Training: the global batch equals one big batch, the launcher runs and learns, every config starts,
wrong flags fail fast, and a run killed with SIGKILL resumes to exactly the uninterrupted result."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from _procs import clean_env, free_port
from conftest import REPO
from tmass.errors import TmassError

DS = os.path.join(REPO, "ds_configs")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_global_batch_of_two_ranks_equals_one_rank(tmp_path, dropout):
    """2 ranks x b = 4 give the loss and gradients of 1 rank x b = 8 (fp32: loss to 1e-5, gradients to 1e-4
    relative + 1e-5) and its weights after 3 SGD steps (to 1e-5), support term included, also with the default
    dropout 0.3: each pair's mask is keyed by its
    global ids and the step, so the two ranks (with different global RNGs) and the two directions of the loss
    use the one mask that the single process uses."""
    from tmass.config import ModelConfig
    from tmass.model.tmass import TMASS

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49000, (8, 9), generator=g)
    ids[:, -1] = 49407
    inputs = {"ids": ids, "mask": torch.ones(8, 9, dtype=torch.long),
              "video": torch.randn(8, 4, 3, 32, 32, generator=g),
              "eps": torch.rand(8, 32, generator=g)}
    mp.spawn(__import__("_dist_workers").global_batch_worker, args=(2, free_port(), inputs, str(tmp_path), dropout),
             nprocs=2)
    got = torch.load(tmp_path / "dist.pt")
    torch.manual_seed(0)
    model = TMASS(ModelConfig(clip_arch="tiny", num_frames=4, transformer_dropout=dropout, support_loss_weight=0.8))
    out = model(inputs["ids"], inputs["mask"], inputs["video"], inputs["eps"], dropout_stream=(24, "dropout", 3, 0))
    out["loss"].backward()
    assert abs(got["loss"].item() - out["loss"].item()) < 1e-5
    if dropout:  # the mask is there: another step's mask gives another loss
        other = model(inputs["ids"], inputs["mask"], inputs["video"], inputs["eps"],
                      dropout_stream=(24, "dropout", 4, 0))
        assert abs(other["loss"].item() - out["loss"].item()) > 1e-4
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    # the weights after 3 steps (SGD: Adam would magnify the rounding noise of the gradients that are 0 in exact
    # arithmetic, such as the attention key biases', to a full step)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        if step:
            model.zero_grad()
            model(inputs["ids"], inputs["mask"], inputs["video"], inputs["eps"],
                  dropout_stream=(24, "dropout", 3 + step, 0))["loss"].backward()
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["weights"][n], p.detach(), rtol=1e-5, atol=1e-5, msg=n)


def train_args(shards, out, *extra, config="cpu_fp32.json", steps=6):
    return ["--deepspeed_config", os.path.join(DS, config), "--preset", "demo", "--num_frames", "4",
            "--train_shards", str(shards / "train-{000000..000003}.tar"),
            "--val_shards", str(shards / "val-000000.tar"),
            "--batch_size", "4", "--max_steps", str(steps), "--output_dir", str(out), "--exp_name", "run",
            "--num_workers", "1", "--log_step", "1", "--stochastic_trials", "3", *extra]


class Launched(subprocess.Popen):
    """A `deepspeed` launcher process whose output goes to a file (a pipe could fill up and block it)."""

    def output(self) -> str:
        return open(self.log_path).read()

    def communicate(self, timeout=None):
        self.wait(timeout=timeout)
        return self.output(), None


def launch(args, world=2):
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(world), "--master_port",
           str(free_port()), os.path.join(REPO, "launch", "train.py"), *args]
    out_dir = args[args.index("--output_dir") + 1]
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, f"launcher-{time.time_ns()}.log")
    p = Launched(cmd, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"), stdout=open(log_path, "w"),
                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
    p.log_path = log_path
    return p


def scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_deepspeed_launcher_two_ranks_learns_and_checkpoints(synthetic_shards, tmp_path):
    p = launch(train_args(synthetic_shards, tmp_path, "--save_every_steps", "20", "--num_epochs", "30",
                          "--batch_size", "8", steps=60))
    output, _ = p.communicate(timeout=600)
    assert p.returncode == 0, output[-4000:]
    run = tmp_path / "run"
    s = scalars(run)
    losses = s["train/loss"]
    assert len(losses) == 60
    assert sum(losses[-12:]) / 12 < sum(losses[:12]) / 12 - 0.2, losses  # from ln 8 = 2.08 down
    for tag in ("train/loss_stochastic", "train/lr_clip", "train/lr_noclip", "train/logit_scale", "train/radius_l1",
                "train/grad_norm", "perf/samples_per_s", "perf/samples_per_s_per_rank", "perf/data_wait_fraction",
                "val/t2v_R@1", "val/v2t_R@1"):
        assert tag in s, tag
    assert max(s["train/lr_noclip"]) == pytest.approx(1e-3, rel=0.05) and s["train/lr_noclip"][-1] < 1e-4
    assert max(s["train/lr_clip"]) == pytest.approx(1e-4, rel=0.05)
    tags = sorted(os.listdir(run / "checkpoints"))
    # saved every 20 steps and at every epoch end (3 steps); the last 3 kept, best apart
    assert sorted(t for t in tags if t.startswith("step")) == ["step54", "step57", "step60"] and "best" in tags
    assert (run / "checkpoints" / "latest").read_text() == "step60"
    assert json.loads((run / "config.json").read_text())["model"]["clip_arch"] == "tiny"
    assert json.loads((run / "best.json").read_text())["step"] % 3 == 0  # validated at every epoch end
    from tmass.logs import plot_curves

    png = plot_curves([str(run)], str(tmp_path / "curves.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000


@pytest.mark.parametrize("config", ["cpu_fp32.json", "cpu_bf16.json", "zero1_bf16.json", "zero2_bf16.json",
                                    "zero2_offload.json", "zero3_bf16.json", "zero3_offload.json",
                                    "cpu_zero3_fp32.json"])
def test_every_cpu_capable_config_starts_and_steps(synthetic_shards, tmp_path, config):
    from tmass.config import parse_config
    from tmass.train import train

    summary = train(parse_config(train_args(synthetic_shards, tmp_path, config=config, steps=1)))
    assert summary["step"] == 1
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step1"


@pytest.mark.parametrize("extra, message", [
    (["--deepspeed_config", os.path.join(DS, "zero2_fp16.json")], "fp16, which DeepSpeed does not run on CPUs"),
    (["--batch_size", "6"], "not divisible by world size 4"),
    (["--train_shards", "/nowhere/train-{000000..000001}.tar"], "train shard(s) missing"),
    (["--clip_arch", "ViT-H/14"], "argument --clip_arch: invalid choice: 'ViT-H/14'"),
    (["--videos_dir", "/v"], "--videos_dir: tmass reads WebDataset shards: build them once with `tmass-build-shards"),
    (["--log_step", "0"], "--log_step must be at least 1"),
    (["--input_res", "64"], "--input_res 64, but the CLIP (--clip_arch tiny) takes 32 x 32 frames"),
    (["--deepspeed_config", "BROKEN"], "is not valid JSON (line 1, column 22"),
])
def test_wrong_flags_fail_before_any_process_group(synthetic_shards, tmp_path, extra, message):
    env = dict(os.environ, WORLD_SIZE="4", DS_ACCELERATOR="cpu")
    if "BROKEN" in extra:
        (tmp_path / "broken.json").write_text('{"train_batch_size": auto}')
        extra = [str(tmp_path / "broken.json") if a == "BROKEN" else a for a in extra]
    p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"),
                        *train_args(synthetic_shards, tmp_path), *extra], capture_output=True, text=True, env=env,
                       timeout=120, cwd=REPO)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def _final(run, out):
    from tmass.checkpoint import consolidated_state

    _, state, _, _ = consolidated_state(str(run), "latest")
    steps = {}
    for r in (0, 1):
        for line in (run / f"samples-rank{r}.jsonl").read_text().splitlines():
            e = json.loads(line)
            steps[(e["step"], e["micro"], r)] = e["keys"]  # a replayed step overwrites the killed attempt's
    return state, steps


@pytest.mark.parametrize("config", ["cpu_fp32.json", "cpu_zero3_fp32.json"])
def test_sigkill_after_a_checkpoint_then_relaunch_is_exact(synthetic_shards, tmp_path, config):
    """ZeRO-2, and ZeRO-3 with every parameter partitioned."""
    args = lambda out: train_args(synthetic_shards, out, "--save_every_steps", "3", "--log_samples",  # noqa: E731
                                  "--caption_sampling", "random", "--video_sample_type", "rand", "--val_shards", "",
                                  "--num_epochs", "4",
                                  steps=16, config=config)
    full = launch(args(tmp_path / "a"))
    assert full.wait(timeout=600) == 0, full.output()[-3000:]
    killed = launch(args(tmp_path / "b"))
    latest = tmp_path / "b" / "run" / "checkpoints" / "latest"
    t = time.time()
    while not (latest.exists() and latest.read_text() in ("step6", "step9")) and time.time() - t < 300:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert int(latest.read_text()[4:]) < 16, "the run ended before it could be killed"
    again = launch(args(tmp_path / "b"))
    assert again.wait(timeout=600) == 0, again.output()[-3000:]
    state_a, steps_a = _final(tmp_path / "a" / "run", tmp_path)
    state_b, steps_b = _final(tmp_path / "b" / "run", tmp_path)
    assert steps_a == steps_b and len(steps_a) == 32  # every step's samples, none repeated or skipped
    for k in state_a:
        torch.testing.assert_close(state_b[k], state_a[k], rtol=0, atol=1e-6, msg=k)


def test_torchrun_and_multi_positive(synthetic_shards, tmp_path):
    """The same entry point under torchrun (2 processes), with --multi_positive (3 captions per video, so a
    global batch in pairs mode holds several pairs of one video)."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.join(REPO, "launch", "train.py"),
           *train_args(synthetic_shards, tmp_path, "--multi_positive", "--caption_sampling", "pairs",
                       "--shuffle_buffer", "0", "--val_shards", "", steps=3)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3 and (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step3"


def test_xpool_baseline_trains_without_the_text_mass(synthetic_shards, tmp_path):
    """--deterministic_text: no noise in training, the radius frozen, and evaluation scores with t alone."""
    from tmass.config import parse_config
    from tmass.checkpoint import load_from_run
    from tmass.train import train

    cfg = parse_config(train_args(synthetic_shards, tmp_path, "--deterministic_text", steps=2))
    assert cfg.model.deterministic_text
    train(cfg)
    model, _ = load_from_run(str(tmp_path / "run"), "step2")
    assert torch.equal(model.radius.linear_proj.weight[:4, :4], torch.eye(4))  # untouched identity init
    assert json.loads((tmp_path / "run" / "best.json").read_text())["results"]["trials"] == 0


def test_param_groups_two_learning_rates_and_optional_no_decay():
    from tmass.config import parse_config
    from tmass.model.tmass import TMASS
    from tmass.engine import param_groups

    model = TMASS(parse_config(["--clip_arch", "tiny"]).model)
    names = {id(p): n for n, p in model.named_parameters()}
    for flags, expected in (([], {"clip", "noclip"}),
                            (["--no_decay_norm_bias"], {"clip", "noclip", "clip_no_decay", "noclip_no_decay"})):
        cfg = parse_config(["--clip_arch", "tiny", "--clip_lr", "2e-6", "--noclip_lr", "3e-5", *flags])
        groups = param_groups(model, cfg)
        assert {g["name"] for g in groups} == expected
        for g in groups:
            assert g["lr"] == (2e-6 if g["name"].startswith("clip") else 3e-5)
            assert all(names[id(p)].startswith("clip.") == g["name"].startswith("clip") for p in g["params"])
            no_decay = g["name"].endswith("no_decay")
            assert g["weight_decay"] == (0.0 if no_decay else 0.2)
            if no_decay:
                assert all(p.dim() < 2 or "norm" in names[id(p)] or "logit_scale" in names[id(p)] for p in g["params"])
        assert sum(len(g["params"]) for g in groups) == len(names)


def launch_until_step_4(shards, tmp_path):
    """A 2-rank run of 60 steps without validation, logging every 2 steps, launched and left running once it
    has logged step 4."""
    args = train_args(shards, tmp_path, "--save_every_steps", "1000", "--num_epochs", "20", "--val_shards", "",
                      "--log_step", "2", steps=60)
    p = launch(args)
    run = tmp_path / "run"
    t = time.time()
    while not (run / "train.log").exists() or "step 4 " not in (run / "train.log").read_text():
        assert time.time() - t < 300 and p.poll() is None, "training did not start"
        time.sleep(0.1)
    return args, p, run


ALIGNMENT_WORKER = """
import json, sys, torch, deepspeed
from tmass import dist
from tmass.config import parse_config
from tmass.model.tmass import TMASS
from tmass.engine import param_groups
dist.init()
cfg = parse_config(["--clip_arch", "tiny", *sys.argv[1:]])
model = TMASS(cfg.model)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(param_groups(model, cfg)), config={
    "train_batch_size": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
print(json.dumps({"misaligned": [n for n, p in engine.module.named_parameters()
                                 if p.numel() % 8 == 0 and p.data_ptr() % 16],
                  "odd": [n for n, p in engine.module.named_parameters() if p.numel() % 8]}))
"""


@pytest.mark.parametrize("flags", [[], ["--no_decay_norm_bias"]])
def test_zero_flat_buffer_keeps_every_weight_16_byte_aligned(flags):
    """ZeRO-1/2 make the module's bf16 parameters views of one flat buffer per group; a weight at an unaligned
    address sends its matmuls to cuBLAS's slow kernels. The addresses are read off a real engine."""
    p = subprocess.run([sys.executable, "-c", ALIGNMENT_WORKER, *flags], capture_output=True, text=True, timeout=300,
                       env=clean_env(DS_ACCELERATOR="cpu"))
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert "clip.logit_scale" in out["odd"]  # the case that matters is there
    assert out["misaligned"] == []


def test_a_run_keeps_its_evaluation_settings_and_refuses_a_changed_relaunch(synthetic_shards, tmp_path, capsys):
    """One run of 2 epochs (5 steps each, 3 validation trials, seed 7), then: upstream's --exp_name/--load_epoch
    find its checkpoints; evaluation takes the run's validation settings unless a flag overrides them, and says
    what it scored; a relaunch with another batch size, learning rate or seed is refused with the differences,
    config.json untouched; --allow_config_change lets it through, and a --max_steps below the step reached is
    an error."""
    from tmass.config import parse_config
    from tmass.evaluate import run as evaluate_run
    from tmass.train import train

    base = train_args(synthetic_shards, tmp_path, "--num_epochs", "2", "--keep_last", "5", "--seed", "7",
                      steps=0)
    base[base.index("--max_steps"):base.index("--max_steps") + 2] = []
    summary = train(parse_config(base))
    assert summary["step"] == 10 and summary["steps_per_epoch"] == 5
    best_step = json.loads((tmp_path / "run" / "best.json").read_text())["step"]
    test = ["--test_shards", str(synthetic_shards / "test-{000000..000001}.tar"), "--num_workers", "0",
            "--output_dir", str(tmp_path), "--exp_name", "run"]
    capsys.readouterr()
    r1 = evaluate_run(parse_config(test + ["--load_epoch", "1"]))
    assert r1["model"]["tag"] == "step5" and r1["model"]["step"] == 5 and r1["model"]["kind"] == "run"
    assert r1["trials"] == 3 and r1["seed"] == 7  # the run's, not the defaults (20 trials, seed 24)
    out = capsys.readouterr()
    assert "--stochastic_trials 3" in out.err and "--seed 7" in out.err
    assert "step 5" in out.out and "21 texts x 7 videos (0 of 7 samples skipped)" in out.out
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text())["model"]["step"] == 5
    best = evaluate_run(parse_config(test + ["--load_epoch", "-1", "--stochastic_trials", "5"]))
    assert best["model"]["tag"] == "best" and best["model"]["step"] == best_step and best["trials"] == 5
    with pytest.raises(TmassError, match="no checkpoint of the end of epoch 3 was kept .epochs kept: 1, 2"):
        evaluate_run(parse_config(test + ["--load_epoch", "3"]))
    config_before = (tmp_path / "run" / "config.json").read_text()
    for change, shown in ((["--batch_size", "8"], "--global_batch_size 4 -> 8"),
                          (["--noclip_lr", "0.5"], "--noclip_lr"), (["--seed", "8"], "--seed 7 -> 8")):
        with pytest.raises(TmassError, match=f"these settings differ .*{shown}.*--allow_config_change"):
            train(parse_config(base + change))
    assert (tmp_path / "run" / "config.json").read_text() == config_before
    with pytest.raises(TmassError, match="--max_steps 3, but .* has already reached step 10"):
        train(parse_config(base + ["--max_steps", "3", "--allow_config_change"]))
    again = train(parse_config(base + ["--log_step", "5"]))  # a setting that may change: the finished run resumes
    assert again["step"] == 10


def test_the_bad_sample_check_holds_for_an_epoch_of_any_size(synthetic_shards, tmp_path):
    """About 23% bad samples in an epoch of fewer than 100 samples (the in-epoch check waits for 100): the
    check at the epoch's end stops the run, naming the bad shard."""
    import shutil

    import webdataset as wds

    from tmass.config import parse_config
    from tmass.data.stream import TooManyBadSamples
    from tmass.train import train

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(4):
        shutil.copy(synthetic_shards / f"train-{i:06d}.tar", shards / f"train-{i:06d}.tar")
    with wds.TarWriter(str(shards / "train-000004.tar")) as w:
        for i in range(6):
            w.write({"__key__": f"novideo{i}", "json": json.dumps({"captions": ["a caption"]}).encode()})
    args = train_args(synthetic_shards, tmp_path, "--train_shards", str(shards / "train-{000000..000004}.tar"),
                      "--train_num_samples", "26", "--val_shards", "",
                      "--num_epochs", "1", "--tokenizer", str(synthetic_shards / "tokenizer"), steps=100)
    with pytest.raises(TooManyBadSamples, match=r"samples were skipped \(no video bytes: .*train-000004.tar"):
        train(parse_config(args))


def test_a_second_launch_on_a_live_run_is_refused_and_a_stale_lock_is_taken_over(synthetic_shards, tmp_path):
    """run.lock: held by a live process of this host, the launch stops before any process group with the
    holder named; held by a dead one, or by this SLURM job before its requeue, it is taken over and released
    at the end."""
    import socket

    from tmass.config import parse_config
    from tmass.train import train

    run = tmp_path / "run"
    run.mkdir()
    lock = run / "run.lock"
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "job": None}))
        with pytest.raises(TmassError, match=f"is in use by pid {holder.pid} on {socket.gethostname()}"):
            train(parse_config(train_args(synthetic_shards, tmp_path, steps=1)))
    finally:
        holder.kill()
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # refused: the lock is untouched
    assert train(parse_config(train_args(synthetic_shards, tmp_path, steps=1)))["step"] == 1  # the holder died
    assert not lock.exists()
    lock.write_text(json.dumps({"host": "another-node", "pid": 1, "job": "4242"}))
    os.environ["SLURM_JOB_ID"] = "4242"
    try:  # the same job, requeued on another node: its own old lock
        assert train(parse_config(train_args(synthetic_shards, tmp_path, "--allow_config_change",
                                             steps=2)))["step"] == 2
    finally:
        del os.environ["SLURM_JOB_ID"]
    lock.write_text(json.dumps({"host": "another-node", "pid": 1, "job": "77"}))  # a live job elsewhere
    with pytest.raises(TmassError, match="in use by pid 1 on another-node .SLURM job 77."):
        train(parse_config(train_args(synthetic_shards, tmp_path, "--allow_config_change", steps=3)))


def test_ranks_stop_with_a_checkpoint_when_the_launcher_alone_is_killed(synthetic_shards, tmp_path):
    """SIGKILL to the `deepspeed` launcher only (not its process group): its ranks notice, save a checkpoint
    together at the end of the step and exit, instead of training on as orphans, and release the run lock."""
    _, p, run = launch_until_step_4(synthetic_shards, tmp_path)
    ranks = subprocess.run(["pgrep", "-f", f"launch/train.py --local_rank.*{tmp_path}"], capture_output=True,
                           text=True).stdout.split()
    assert len(ranks) >= 2  # the 2 ranks and their loader workers
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    t = time.time()
    from tmass.dist import process_alive

    while any(process_alive(int(r)) for r in ranks):
        assert time.time() - t < 120, "the ranks train on without their launcher"
        time.sleep(0.2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "signal" and 3 <= summary["step"] < 60
    assert (run / "checkpoints" / "latest").read_text() == f"step{summary['step']}"
    assert not (run / "run.lock").exists()


def test_zero3_trains_the_weights_of_zero2_and_exports(synthetic_shards, tmp_path):
    """ZeRO-3 with every parameter partitioned (ds_configs/cpu_zero3_fp32.json sets no persistence threshold, so
    even the 1-element logit_scale is split over the ranks) against ZeRO-2: 2 CPU ranks, 4 steps with the support
    loss and a validation. The same validation metrics, and weights equal to 1e-6 (the reductions add in another
    order); the export through zero_to_fp32 loads in CLIPModel.from_pretrained with the ZeRO-2 run's weights."""
    from transformers import CLIPModel

    from tmass.checkpoint import consolidated_state
    from tmass.cli import export_main

    states, best = {}, {}
    for name, config in (("z2", "cpu_fp32.json"), ("z3", "cpu_zero3_fp32.json")):
        p = launch(train_args(synthetic_shards, tmp_path / name, "--support_loss_weight", "0.8", "--evals_per_epoch",
                              "1", config=config, steps=4))
        assert p.wait(timeout=600) == 0, p.output()[-3000:]
        _, states[name], _, meta = consolidated_state(str(tmp_path / name / "run"), "latest")
        assert meta["step"] == 4
        best[name] = json.loads((tmp_path / name / "run" / "best.json").read_text())
    assert set(states["z2"]) == set(states["z3"])
    for k in states["z2"]:
        torch.testing.assert_close(states["z3"][k], states["z2"][k], rtol=0, atol=1e-6, msg=k)
    assert best["z3"]["results"]["t2v"] == best["z2"]["results"]["t2v"] and best["z3"]["step"] == best["z2"]["step"]
    assert export_main([str(tmp_path / "z3" / "run"), str(tmp_path / "export"), "--tag", "latest"]) == 0
    clip = CLIPModel.from_pretrained(tmp_path / "export", local_files_only=True)
    for k, v in clip.state_dict().items():
        if f"clip.{k}" in states["z2"]:
            torch.testing.assert_close(v.reshape(-1), states["z2"][f"clip.{k}"].reshape(-1), rtol=0, atol=1e-6)


def test_the_frames_are_normalised_with_the_clips_own_statistics(synthetic_shards, tmp_path):
    """--clip_path's preprocessor_config.json names the pixel mean and std. Training takes them (its weights are
    those of a run given the same numbers as --image_mean/--image_std, and differ from OpenAI's statistics') and
    fixes them in the run's config.json; evaluating the run uses them (its scores are those of an evaluation given
    them by flag, and differ from one given OpenAI's)."""
    import numpy as np
    from transformers import CLIPModel

    from tmass.checkpoint import consolidated_state
    from tmass.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, parse_config
    from tmass.model.clip import clip_config
    from tmass.train import train

    torch.manual_seed(0)
    for name in ("own", "plain"):
        CLIPModel(clip_config("tiny")).save_pretrained(tmp_path / name)  # the same seed: the same weights
        torch.manual_seed(0)
    mean, std = "0.5,0.4,0.3", "0.2,0.25,0.3"
    (tmp_path / "own" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
         "do_normalize": True}))
    openai = [",".join(map(str, OPENAI_CLIP_MEAN)), ",".join(map(str, OPENAI_CLIP_STD))]
    runs = {"own": ["--clip_path", str(tmp_path / "own")],
            "flags": ["--clip_path", str(tmp_path / "plain"), "--image_mean", mean, "--image_std", std],
            "openai": ["--clip_path", str(tmp_path / "plain")]}
    states = {}
    for name, extra in runs.items():  # in this process: one rank
        train(parse_config(train_args(synthetic_shards, tmp_path / name, *extra, "--val_shards", "", steps=4)))
        states[name] = consolidated_state(str(tmp_path / name / "run"), "latest")[1]
    config = json.loads((tmp_path / "own" / "run" / "config.json").read_text())["model"]
    assert (config["image_mean"], config["image_std"]) == (repr(0.5) + ",0.4,0.3", "0.2,0.25,0.3")
    opn = json.loads((tmp_path / "openai" / "run" / "config.json").read_text())["model"]
    assert [float(x) for x in opn["image_mean"].split(",")] == list(OPENAI_CLIP_MEAN)
    for k in states["own"]:
        assert torch.equal(states["own"][k], states["flags"][k]), k
    assert any(not torch.equal(states["own"][k], states["openai"][k]) for k in states["own"])
    init = CLIPModel.from_pretrained(tmp_path / "own").state_dict()  # the steps did train (the warm-up's first is 0)
    assert any(not torch.equal(states["own"]["clip." + k], v) for k, v in init.items() if "clip." + k in states["own"])

    def sims(name, *flags):
        path = tmp_path / f"sims-{name}.npy"
        p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "eval.py"), "--checkpoint",
                            str(tmp_path / "own" / "run"), "--test_shards", str(synthetic_shards / "test-000000.tar"),
                            "--num_workers", "0", "--stochastic_trials", "2", "--results", str(tmp_path / "r.json"),
                            "--save_sims", str(path), *flags],
                           cwd=REPO, env=clean_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return np.load(path)

    default = sims("default")
    assert np.array_equal(default, sims("flags", "--image_mean", mean, "--image_std", std))
    assert not np.allclose(default, sims("openai", "--image_mean", openai[0], "--image_std", openai[1]))
