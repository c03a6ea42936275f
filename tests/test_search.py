"""tmass-index and tmass-search: the index against a re-encoding of the shards, stage 1 against a float64 loop,
stage 2 against the evaluation's own scores of the same (text, video) pairs, resuming, refusals, the command
lines, and the HTML page loaded in a headless browser."""

import json
import os
from html import escape as html_escape
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, export_tiny
from tmass.config import config_of
from tmass.errors import ConfigError, DataError
from tmass import search as S


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, synthetic_shards):
    """A tiny model whose pooling and radius are off their identity init, so that stage 2 is not stage 1."""
    return export_tiny(tmp_path_factory.mktemp("search_model"), synthetic_shards / "tokenizer", seed=3, perturb=0.2)


def build(tmp, shards, model_dir, dtype="float32", per_part=1, **kw):
    cfg = config_of({"checkpoint": str(model_dir), "num_workers": 0, "eval_batch_size": 2})
    opts = S.IndexOptions(out=str(tmp), shards=str(shards / "test-*.tar"), dtype=dtype, shards_per_part=per_part, **kw)
    return S.build_index(cfg, opts)


def load(model_dir):
    from tmass.checkpoint import load_model
    from tmass.config import ModelConfig

    return load_model(ModelConfig(), str(model_dir))[0].eval()


@pytest.fixture(scope="module")
def index32(tmp_path_factory, synthetic_shards, model_dir):
    folder = tmp_path_factory.mktemp("index32")
    build(folder, synthetic_shards, model_dir)
    return folder


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_index_is_a_re_encoding_of_the_shards(synthetic_shards, model_dir, index32, tmp_path, dtype):
    """Each video decoded, transformed and encoded on its own, outside the index's stream and batches."""
    import webdataset as wds

    from tmass.data.transforms import eval_transform, normalize
    from tmass.data.video import decode_frames

    folder = index32 if dtype == "float32" else build(tmp_path / "i16", synthetic_shards, model_dir, dtype)
    index, model = S.Index(folder), load(model_dir)
    shards = [str(synthetic_shards / f"test-00000{i}.tar") for i in range(2)]
    samples = [(url, pos, s) for url in shards for pos, s in enumerate(wds.WebDataset(url, shardshuffle=False))]
    assert len(index) == len(samples) == 7 and len(index.means) == 2  # one part per shard
    tol = {"float32": dict(rtol=1e-4, atol=1e-5), "float16": dict(rtol=2e-3, atol=2e-3)}[dtype]
    for i, (url, pos, s) in enumerate(samples):
        frames = eval_transform(decode_frames(s["mp4"], 4, "uniform"), 32)
        with torch.no_grad():
            want = model.encode_frames(normalize(frames[None]))[0].double()
        v = index.videos[i]
        assert (v["key"], v["shard"], v["pos"]) == (s["__key__"], url, pos)
        assert v["caption"] == json.loads(s["json"])["captions"][0]
        got = index.frames_of(torch.tensor([i]))[0].double()
        torch.testing.assert_close(got, want, **tol)
        mean = want.mean(0) / want.mean(0).norm()
        part, row = (0, i) if i < index.offsets[1] else (1, i - index.offsets[1])
        torch.testing.assert_close(torch.from_numpy(np.asarray(index.means[part][row], dtype=np.float64)), mean,
                                   **tol)


def exhaustive(model, synthetic_shards, cfg):
    """Evaluation's encoding and its scores of every (text, video) pair [N_t, N_v]."""
    from tmass.data.stream import EvalStream
    from tmass.data.tokenizer import load_tokenizer
    from tmass.evaluate import encode
    from tmass.model.scoring import score_rows

    stream = EvalStream([str(synthetic_shards / f"test-00000{i}.tar") for i in range(2)], cfg.data,
                        load_tokenizer(str(synthetic_shards / "tokenizer")), 3, num_frames=4)
    enc = encode(model, stream, torch.device("cpu"))
    return enc, score_rows(model, enc.text, enc.frames, torch.arange(len(enc.text)), cfg.eval, cfg.seed)


@pytest.mark.parametrize("noise", ["per_text", "per_pair"])
def test_stage2_is_the_evaluations_score_and_stage1_a_float64_loop(synthetic_shards, model_dir, index32, noise):
    model, index = load(model_dir), S.Index(index32)
    cfg = config_of({"stochastic_trials": 5, "trial_noise": noise, "seed": 7, "input_res": 32, "num_workers": 0})
    enc, full = exhaustive(model, synthetic_shards, cfg)
    k = 4
    s1, cand = S.stage1(index, enc.text, k)
    # stage 1 against a loop in float64 over the index's own frames
    for j in range(len(enc.text)):
        t = enc.text[j].double()
        want = [float(t @ index.frames_of(torch.tensor([i]))[0].double().mean(0)
                      / t.norm() / index.frames_of(torch.tensor([i]))[0].double().mean(0).norm()) for i in range(7)]
        order = np.argsort(want)[::-1][:k]
        assert cand[j].tolist() == order.tolist(), j
        np.testing.assert_allclose(s1[j].numpy(), np.array(want)[order], rtol=1e-5, atol=1e-6)
    frames = torch.stack([index.frames_of(c) for c in cand])
    s2 = S.stage2(model, enc.text, torch.arange(len(enc.text)), frames, cand, cfg)
    torch.testing.assert_close(s2, full.gather(1, cand), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(s2, s1, atol=1e-3)  # stage 2 is another score
    # every video a candidate: the two stages rank as the exhaustive evaluation does
    hits = S.search(model, index, enc.text, cfg, top_k=7, candidates=7)
    for j, h in enumerate(hits):
        assert [x["id"] for x in h] == torch.argsort(full[j], descending=True, stable=True).tolist()


def test_a_killed_build_resumes_and_other_settings_are_refused(synthetic_shards, model_dir, exported, index32,
                                                               tmp_path, monkeypatch):
    folder = tmp_path / "idx"
    real, calls = S.write_part, []

    def dies_after_one(out, k, *args):
        if calls:
            raise KeyboardInterrupt  # the job killed between two parts
        calls.append(k)
        real(out, k, *args)

    monkeypatch.setattr(S, "write_part", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        build(folder, synthetic_shards, model_dir)
    assert (folder / "part-00000.json").exists() and not (folder / "part-00001.json").exists()
    with pytest.raises(DataError, match="part 1 of 2 is missing; rerun tmass-index"):
        S.Index(folder)
    encoded = []
    monkeypatch.setattr(S, "write_part", real)
    real_encode = S.encode_part
    monkeypatch.setattr(S, "encode_part",
                        lambda m, c, urls, *a, **kw: encoded.append(urls) or real_encode(m, c, urls, *a, **kw))
    build(folder, synthetic_shards, model_dir)
    assert encoded == [[str(synthetic_shards / "test-000001.tar")]]  # only the part that was not done
    for name in sorted(os.listdir(index32)):
        a, b = index32 / name, folder / name
        if name.endswith(".npy"):
            assert np.array_equal(np.load(a), np.load(b)), name
        elif name != "manifest.json":
            assert json.loads(a.read_text()) == json.loads(b.read_text()), name
    with pytest.raises(ConfigError, match=r"other settings \(dtype differ\): pass --overwrite"):
        build(folder, synthetic_shards, model_dir, dtype="float16")
    with pytest.raises(ConfigError, match="fingerprint"):
        build(folder, synthetic_shards, exported)
    build(folder, synthetic_shards, model_dir, dtype="float16", overwrite=True)
    assert S.Index(folder).frames[0].dtype == np.float16
    # searching with other weights than the index's is refused; a torn part file is named
    with pytest.raises(ConfigError, match="not the one that made"):
        S.open_for_search(config_of({"checkpoint": str(exported)}), str(folder))
    npy = folder / "part-00001.frames.npy"
    npy.write_bytes(npy.read_bytes()[:-100])
    with pytest.raises(DataError, match="part-00001.frames.npy"):
        S.Index(folder)


def run(script, args, world=1):
    from _procs import clean_env, free_port

    env = clean_env(DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.join(REPO, "launch", script)]
    if world > 1:
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(world),
               "--master_port", str(free_port()), cmd[1]]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def browser():
    exe = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs chromium-headless-shell (.ci/run), and it is not there")
        pytest.skip("no headless chromium here (apt-get install chromium-headless-shell)")
    return exe


def test_index_on_two_ranks_then_search_from_the_command_line(synthetic_shards, model_dir, index32, tmp_path):
    """launch/index.py on 2 ranks writes the 1-rank index; launch/search.py prints hits as text and JSON, and its
    HTML page shows every hit's thumbnail in a headless browser."""
    folder = tmp_path / "idx2"
    p = run("index.py", ["--checkpoint", str(model_dir), "--shards", str(synthetic_shards / "test-*.tar"),
                         "--index", str(folder), "--shards_per_part", "1", "--num_workers", "1",
                         "--index_dtype", "float32"], world=2)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for name in sorted(os.listdir(index32)):
        if name.endswith(".npy"):
            assert np.array_equal(np.load(index32 / name), np.load(folder / name)), name
    html = tmp_path / "hits.html"
    query = "a red circle moves left <b>"
    p = run("search.py", [query, "two blue squares", "--index", str(folder), "--top_k", "3", "--candidates", "5",
                          "--json", "--html", str(html)])
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert [r["query"] for r in out["results"]] == [query, "two blue squares"]
    for r in out["results"]:
        assert [h["rank"] for h in r["hits"]] == [1, 2, 3]
        assert [h["score"] for h in r["hits"]] == sorted((h["score"] for h in r["hits"]), reverse=True)
        assert all(h["key"].startswith("synth_test_") for h in r["hits"])
    assert out["settings"]["candidates"] == 5
    p = run("search.py", ["a red circle", "--index", str(folder), "--top_k", "2"])
    assert p.returncode == 0 and "query: a red circle" in p.stdout and len(p.stdout.strip().splitlines()) == 4
    page = html.read_text()
    assert html_escape(query) in page and query not in page
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", "<script>addEventListener('load', () => {document.title = 'loaded:' + "
                                  "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length})"
                                  "</script></body>"))
    dom = subprocess.run([browser(), "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "<title>loaded:6</title>" in dom, dom[:500]  # 2 queries x 3 hits, every thumbnail decoded


def test_command_line_errors_name_the_fix(tmp_path, synthetic_shards, model_dir):
    p = run("search.py", ["x", "--index", str(tmp_path / "none")])
    assert p.returncode == 2 and "no index there (manifest.json); make one with tmass-index" in p.stderr
    p = run("index.py", ["--shards", str(synthetic_shards / "test-*.tar"), "--index", str(tmp_path / "i")])
    assert p.returncode == 2 and "an index needs trained weights: pass --checkpoint" in p.stderr
    p = run("search.py", ["x", "--index", str(tmp_path), "--top_k", "0"])
    assert p.returncode == 2 and "--top_k and --candidates must be at least 1" in p.stderr
    p = run("search.py", ["x", "--index", "y", "--topk", "3"])
    assert p.returncode == 2 and "did you mean --top_k" in p.stderr
