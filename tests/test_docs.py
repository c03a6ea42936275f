"""The documentation's commands that run on a CPU machine, run verbatim (taken from the Markdown) on small inputs
that the tests make: the README's own-videos quickstart (CSV -> shards -> train -> eval, with a tiny CLIP placed
in a HF cache under the name the README uses) and the MSR-VTT shard command on a fake tree in the real
annotation formats. Every relative link of the README and docs points at a file that exists."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest

from _media import make_clip
from _procs import clean_env
from conftest import REPO

DOCS = [os.path.join(REPO, "README.md")] + [os.path.join(REPO, "docs", f) for f in sorted(os.listdir(
    os.path.join(REPO, "docs")))]


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


def test_the_msrvtt_shard_command_on_a_fake_tree(tmp_path):
    """The docs' MSR-VTT command, verbatim, on 505 train videos (500 held out for validation) and 3 test ones."""
    command = [ln for ln in block_with(os.path.join(REPO, "README.md"), "--source msrvtt").splitlines()
               if ln.startswith("tmass-build-shards --source msrvtt")][0]
    assert command in block_with(os.path.join(REPO, "docs", "data.md"), "--source msrvtt")
    anns, vids = tmp_path / "data" / "MSRVTT" / "anns", tmp_path / "data" / "MSRVTT" / "videos"
    anns.mkdir(parents=True)
    vids.mkdir(parents=True)
    clip = make_clip(32, 32, fps=3, seconds=1)
    train = [f"video{i}" for i in range(505)]
    test = ["video9770", "video9771", "video9772"]
    for v in train + test:
        (vids / f"{v}.mp4").write_bytes(clip)
    sentences = [{"video_id": v, "caption": f"caption {k} of {v}", "sen_id": n}
                 for n, (v, k) in enumerate((v, k) for v in train + test for k in range(2))]
    (anns / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": [], "sentences": sentences}))
    (anns / "MSRVTT_train.9k.csv").write_text("video_id\n" + "\n".join(train) + "\n")
    (anns / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n" + "".join(
        f"ret{i},msr{v[5:]},{v},a sentence about {v}\n" for i, v in enumerate(test)))
    env = clean_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    run_block(command, tmp_path, env)
    totals = {s: json.loads((tmp_path / "shards" / "msrvtt" / f"{s}.json").read_text())["totals"]
              for s in ("train", "val", "test")}
    assert (totals["train"]["samples"], totals["val"]["samples"], totals["test"]["samples"]) == (5, 500, 3)
    assert totals["val"]["shards"] == 3 and totals["train"]["captions"] == 10


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_links_point_at_files_that_exist(path):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", open(path).read()):
        if "://" not in target:
            assert os.path.exists(os.path.join(os.path.dirname(path), target)), (path, target)
