"""The documentation's commands that run on a CPU machine, run verbatim (taken from the Markdown) on small inputs
that the tests make: the README's own-videos quickstart (CSV -> shards -> train -> eval, with a tiny CLIP placed
in a HF cache under the name the README uses); the MSR-VTT shard command on a fake tree in the real annotation
formats, then the one-node training and evaluation commands of the README and docs (2 CPU ranks for 8 GPUs, a
temporary folder for /shared/, tiny CLIPs there), upstream's --exp_name/--load_epoch evaluation and a released
upstream .pth; the synthetic, LSMDC and DiDeMo shard commands. Every relative link of the README and docs points
at a file that exists. Not run here: the SLURM commands (tests/test_slurm_cluster.py runs the same scripts on
a two-node cluster, --nodes 2 included) and the demo itself (`bash launch/demo.sh`)."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest

from _media import make_clip
from _procs import clean_env, free_port
from conftest import REPO

DOCS = [os.path.join(REPO, "README.md")] + [os.path.join(REPO, "docs", f) for f in sorted(os.listdir(
    os.path.join(REPO, "docs"))) if f.endswith(".md")]


def bash_blocks(path):
    text = open(path).read()
    return [m.group(1) for m in re.finditer(r"```bash\n(.*?)```", text, re.S)]


def block_with(path, needle):
    (block,) = [b for b in bash_blocks(path) if needle in b]
    return block


def run_block(block, cwd, env):
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, (block, p.stdout[-3000:], p.stderr[-4000:])
    return p


def fake_hub_clip(cache, name, captions):
    """A tiny random CLIP and a tokenizer of `captions`, laid out as `huggingface-cli download` leaves them."""
    from transformers import CLIPModel

    from tmass.data.tokenizer import build_caption_tokenizer, text_config_overrides
    from tmass.model.clip import clip_config

    repo = cache / ("models--" + name.replace("/", "--"))
    snap = repo / "snapshots" / ("ab" * 20)
    tok = build_caption_tokenizer(captions, str(snap))
    conf = clip_config("tiny")
    for k, v in text_config_overrides(tok).items():
        setattr(conf.text_config, k, v)
    CLIPModel(conf).save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snap.name)


def test_the_readme_quickstart_on_your_own_videos(tmp_path):
    block = block_with(os.path.join(REPO, "README.md"), "--source csv --anno train.csv")
    work = tmp_path / "work"
    (work / "clips").mkdir(parents=True)
    os.symlink(os.path.join(REPO, "ds_configs"), work / "ds_configs")
    captions = {}
    for i in range(14):
        name = f"clip{i:02d}.mp4"
        (work / "clips" / name).write_bytes(make_clip(64, 48, fps=6, seconds=2))
        captions[name] = [f"a square number {i} moves right", f"clip {i} shows a bright square"]
    for split, names in (("train", list(captions)[:8]), ("val", list(captions)[8:11]),
                         ("test", list(captions)[11:])):
        with open(work / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["video", "caption"])
            for n in names:
                for c in captions[n]:
                    w.writerow([n, c])
    cache = tmp_path / "hf"
    fake_hub_clip(cache, "openai/clip-vit-base-patch32", [c for cs in captions.values() for c in cs])
    bin_dir = os.path.dirname(sys.executable)
    env = clean_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
                    PATH=bin_dir + os.pathsep + os.environ["PATH"])
    p = run_block(block, work, env)
    assert "t2v" in p.stdout and "v2t" in p.stdout
    results = json.loads((work / "outputs" / "mine" / "eval_results.json").read_text())
    assert results["num_videos"] == 3 and results["num_texts"] == 6 and results["model"]["kind"] == "run"
    assert "[INFO]" not in p.stdout + p.stderr  # DeepSpeed's INFO lines are off by default


def commands(block):
    """The commands of a bash block, continuation lines joined, comments dropped."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def on_this_machine(command, shared):
    """A GPU node's command as this CPU machine runs it: 2 ranks instead of 8 (on a free port), and the cluster's
    /shared/ folder in a temporary one. Nothing else changes."""
    assert "--num_gpus 8 " in command
    return command.replace("--num_gpus 8", f"--num_gpus 2 --master_port {free_port()}").replace(
        "/shared/", f"{shared}/")


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory):
    """A fake MSR-VTT tree in the real annotation formats (505 train videos, 20 test videos), its shards built by
    the README's command, verbatim, and tiny CLIPs with the captions' tokenizer in /shared."""
    root = tmp_path_factory.mktemp("msrvtt")
    anns, vids = root / "data" / "MSRVTT" / "anns", root / "data" / "MSRVTT" / "videos"
    anns.mkdir(parents=True)
    vids.mkdir(parents=True)
    clip = make_clip(32, 32, fps=3, seconds=1)
    train = [f"video{i}" for i in range(505)]
    test = [f"video{9000 + i}" for i in range(20)]
    for v in train + test:
        (vids / f"{v}.mp4").write_bytes(clip)
    sentences = [{"video_id": v, "caption": f"caption {k} of {v}", "sen_id": n}
                 for n, (v, k) in enumerate((v, k) for v in train + test for k in range(2))]
    (anns / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": [], "sentences": sentences}))
    (anns / "MSRVTT_train.9k.csv").write_text("video_id\n" + "\n".join(train) + "\n")
    (anns / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n" + "".join(
        f"ret{i},msr{v[5:]},{v},a sentence about {v}\n" for i, v in enumerate(test)))
    command = [c for c in commands(block_with(os.path.join(REPO, "README.md"), "--source msrvtt"))
               if c.startswith("tmass-build-shards --source msrvtt")][0]
    assert command in commands(block_with(os.path.join(REPO, "docs", "data.md"), "--source msrvtt"))
    env = clean_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], DS_ACCELERATOR="cpu")
    run_block(command, root, env)
    captions = [x["caption"] for x in sentences] + [f"a sentence about {v}" for v in test]
    for name in ("clip-vit-base-patch16", "clip-vit-base-patch32"):
        tiny_clip_dir(root / "shared" / name, captions)
    os.symlink(os.path.join(REPO, "ds_configs"), root / "ds_configs")
    os.symlink(os.path.join(REPO, "launch"), root / "launch")
    return root, env


def tiny_clip_dir(path, captions):
    from transformers import CLIPModel

    from tmass.data.tokenizer import build_caption_tokenizer, text_config_overrides
    from tmass.model.clip import clip_config

    tok = build_caption_tokenizer(captions, str(path))
    conf = clip_config("tiny")
    for k, v in text_config_overrides(tok).items():
        setattr(conf.text_config, k, v)
    CLIPModel(conf).save_pretrained(path)


def test_the_msrvtt_shard_command_on_a_fake_tree(msrvtt):
    """The docs' MSR-VTT command, verbatim: 500 of the 505 train videos held out for validation."""
    root, _ = msrvtt
    totals = {s: json.loads((root / "shards" / "msrvtt" / f"{s}.json").read_text())["totals"]
              for s in ("train", "val", "test")}
    assert (totals["train"]["samples"], totals["val"]["samples"], totals["test"]["samples"]) == (5, 500, 20)
    assert totals["val"]["shards"] == 3 and totals["train"]["captions"] == 10


def test_the_msrvtt_node_commands_on_a_fake_tree(msrvtt):
    """The README's one-node MSR-VTT training and evaluation, then the docs' training command (the same run:
    it finds the run finished) and upstream's --exp_name/--load_epoch evaluation, on 2 CPU ranks."""
    root, env = msrvtt
    shared = root / "shared"
    readme = [c for c in commands(block_with(os.path.join(REPO, "README.md"), "--source msrvtt"))
              if c.startswith("deepspeed ")]
    train_doc = commands(block_with(os.path.join(REPO, "docs", "training.md"), "--preset msrvtt"))
    eval_doc = [c for c in commands(block_with(os.path.join(REPO, "docs", "evaluation.md"), "--load_epoch"))
                if "--load_epoch" in c]
    assert [c.split()[3] for c in readme] == ["launch/train.py", "launch/eval.py"] and len(eval_doc) == 1
    for command in readme + train_doc + eval_doc:
        p = run_block(on_this_machine(command, shared), root, env)
        info = [ln for ln in (p.stdout + p.stderr).splitlines() if "[INFO]" in ln]
        # the ranks log none; the launcher's own lines stay unless `deepspeed --log_level warning`
        assert all("[runner.py:" in ln or "[launch.py:" in ln for ln in info), info
    run = root / "outputs" / "MSR-VTT-9k"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world"] == 2 and summary["epoch"] == 5 and summary["best"]["step"] is not None
    results = json.loads((run / "eval_results.json").read_text())
    assert results["num_videos"] == 20 and results["num_texts"] == 20 and results["dsl"] is True


def test_the_upstream_checkpoint_command_on_a_fake_tree(msrvtt):
    """docs/evaluation.md's evaluation of a released upstream .pth, verbatim but for /shared/: a checkpoint with
    upstream's key names, stale buffers and 0-dim logit_scale, on the tiny CLIP in /shared."""
    import torch
    from transformers import CLIPModel

    root, env = msrvtt
    clip = CLIPModel.from_pretrained(root / "shared" / "clip-vit-base-patch32")
    g = torch.Generator().manual_seed(0)
    D, F = clip.config.projection_dim, 12  # the default --num_frames

    def near(*shape):
        return (torch.eye(*shape) if len(shape) == 2 else torch.ones(shape)) + 0.1 * torch.randn(*shape, generator=g)

    state = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    state["clip.vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)  # stale, as upstream's
    for name in ("q_proj", "k_proj", "v_proj", "out_proj", "linear_proj"):
        prefix = f"pool_frames.{'cross_attn.' if name != 'linear_proj' else ''}{name}"
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = near(D, D), 0.1 * torch.randn(D, generator=g)
    for i in (1, 2, 3):
        state[f"pool_frames.layer_norm{i}.weight"], state[f"pool_frames.layer_norm{i}.bias"] = near(D), near(D) - 1
    state["stochastic.std_branch.linear_proj.weight"] = near(D, F)
    state["stochastic.std_branch.linear_proj.bias"] = 0.1 * torch.randn(D, generator=g)
    state["stochastic.std_branch.learnable_scalar"] = torch.empty(1)
    torch.save({"epoch": 5, "state_dict": state}, root / "model_best.pth")
    (command,) = [c for c in commands(block_with(os.path.join(REPO, "docs", "evaluation.md"), "model_best.pth"))
                  if "model_best.pth" in c]
    p = run_block(command.replace("/shared/", f"{root / 'shared'}/"), root, env)
    assert "t2v" in p.stdout
    results = json.loads((root / "model_best_eval_results.json").read_text())
    assert results["model"]["kind"] == "upstream" and results["num_videos"] == 20 and results["trials"] == 20


def test_the_synthetic_corpus_command(tmp_path):
    """docs/data.md's synthetic corpus (the demo's): the command as written parses to 1,000 / 100 / 200 videos of
    5 captions, and runs as written with smaller splits appended (the full corpus takes ~100 s to build)."""
    from tmass.shards.cli import parser

    (command,) = [c for c in commands(block_with(os.path.join(REPO, "docs", "data.md"), "--source synthetic"))
                  if "--source synthetic" in c]
    a = parser().parse_args(command.split()[1:])
    assert (a.num_train, a.num_val, a.num_test, a.captions_per_video) == (1000, 100, 200, 5)
    run_block(command + " --num_train 30 --num_val 6 --num_test 9", tmp_path,
              clean_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]))
    totals = {s: json.loads((tmp_path / "data" / "synthetic" / f"{s}.json").read_text())["totals"]
              for s in ("train", "val", "test")}
    assert [(t["samples"], t["captions"]) for t in totals.values()] == [(30, 150), (6, 30), (9, 45)]


def test_the_lsmdc_and_didemo_shard_commands_on_fake_trees(tmp_path):
    """docs/data.md's LSMDC and DiDeMo commands, verbatim, on two videos per split in each dataset's own layout:
    LSMDC16's tab-separated files with {movie}/{clip_id}.avi, DiDeMo's csv with videos of mixed extensions."""
    clip = make_clip(32, 32, fps=3, seconds=1)
    lsmdc, didemo = tmp_path / "data" / "LSMDC", tmp_path / "data" / "DiDeMo"
    (lsmdc / "videos" / "1001_Flight").mkdir(parents=True)
    (didemo / "videos").mkdir(parents=True)
    lsmdc_files = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
                   "test": "LSMDC16_challenge_1000_publictect.csv"}
    for k, (split, name) in enumerate(lsmdc_files.items()):
        lines = []
        for i in range(2):
            cid = f"1001_Flight_0{k}.00.{i:02d}.000-0{k}.00.{i:02d}.500"
            (lsmdc / "videos" / "1001_Flight" / f"{cid}.avi").write_bytes(clip)
            t0, t1 = cid[12:].split("-")
            lines.append("\t".join([cid, t0, t1, t0, t1, f"SOMEONE does thing {i} in {split}."]))
        (lsmdc / name).write_text("\n".join(lines) + "\n")
        with open(didemo / f"didemo_{split}_label.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["success", "video_path", "starts", "ends", "text", "formatted_data"])
            for i, ext in enumerate(("m4v", "avi")):
                (didemo / "videos" / f"{split}{i}@N0{k}_{i}.{ext}").write_bytes(clip)
                w.writerow(["True", f"/x/all_videos/{split}{i}@N0{k}_{i}.{ext}", "tensor([[0]])", "tensor([[31]])",
                            f"a man walks. then he sits in {split} video {i}.", f"/x/{split}_data_id_{i}.pth"])
    env = clean_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    block = commands(block_with(os.path.join(REPO, "docs", "data.md"), "--source lsmdc"))
    for source in ("lsmdc", "didemo"):
        (command,) = [c for c in block if c.startswith(f"tmass-build-shards --source {source} ")]
        run_block(command, tmp_path, env)
        for split in ("train", "val", "test"):
            totals = json.loads((tmp_path / "shards" / source / f"{split}.json").read_text())["totals"]
            assert totals["samples"] == 2, (source, split, totals)


def test_the_demo_comparison_on_a_small_corpus(tmp_path):
    """launch/demo.sh --compare --seeds 1 on corpora of 32 train videos for one epoch (its DATA, OUT and EPOCHS
    settings; the other arguments go to the shard builder): both corpora's T-MASS and X-Pool runs (trained and
    scored by the same functions as the plain demo), the ablations, the tables, the pictures and the JSON; and no
    DeepSpeed INFO line. Then the README's search commands on the T-MASS run of the full corpus."""
    env = clean_env(DATA=str(tmp_path / "data"), OUT=str(tmp_path / "out"), EPOCHS="1",
                    PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    sizes = ["--num_train", "32", "--num_val", "8", "--num_test", "16"]
    p = subprocess.run(["bash", os.path.join(REPO, "launch", "demo.sh"), "--compare", "--seeds", "1", *sizes],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    out = tmp_path / "out"
    for corpus in ("full", "partial"):
        for method, trials in (("tmass", 20), ("xpool", 0)):
            r = json.loads((out / f"cmp_{corpus}_s1_{method}" / "test_results.json").read_text())
            assert r["num_videos"] == 16 and r["trials"] == trials and r["seed"] is not None
    extra = {name: json.loads((out / "cmp_partial_s1_tmass" / name).read_text())
             for name in ("test_deterministic.json", "test_trials1.json", "test_per_pair.json")}
    assert extra["test_deterministic.json"]["trials"] == 0 and extra["test_trials1.json"]["trials"] == 1
    assert extra["test_per_pair.json"]["trial_noise"] == "per_pair"
    report = json.loads((out / "compare.json").read_text())
    assert set(report) == {"full", "partial", "ablations"} and len(report["ablations"]) == 7  # 6 rows + paired
    assert "T-MASS - X-Pool (paired)" in report["full"] and "partial captions, 1 seed(s)" in p.stdout
    assert all((out / f).stat().st_size > 1000 for f in ("compare_curves.png", "compare_radius.png"))
    assert "[INFO]" not in p.stdout + p.stderr
    # the README's search commands, verbatim, on the demo's layout: one of these runs as outputs/demo
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "outputs").mkdir()
    os.symlink(tmp_path / "data", work / "data" / "synthetic")
    os.symlink(out / "cmp_full_s1_tmass", work / "outputs" / "demo")
    p = run_block(block_with(os.path.join(REPO, "README.md"), "tmass-index"), work, env)
    hits = [line for line in p.stdout.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert len(hits) == 5 and all("synth_test_" in h for h in hits), p.stdout
    assert (work / "outputs" / "demo" / "hits.html").read_text().count("<img ") == 5
    p = run_block("tmass-search 'a red circle' --index outputs/demo/index --json", work, env)
    assert len(json.loads(p.stdout)["results"][0]["hits"]) == 10  # stdout holds the JSON alone, from a run dir
    assert block_with(os.path.join(REPO, "README.md"), "tmass-index") in bash_blocks(
        os.path.join(REPO, "docs", "search.md"))


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_links_point_at_files_that_exist(path):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", open(path).read()):
        if "://" not in target:
            assert os.path.exists(os.path.join(os.path.dirname(path), target)), (path, target)
