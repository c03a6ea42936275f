"""The sharded evaluation against independent references: a float64 triple loop for the scores, hand-made
ranks for the metrics, and a second world size and chunk size for the sharding."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import _reference as ref
from conftest import REPO
from tmass.errors import TmassError
from tmass.config import EvalConfig, ModelConfig
from tmass.evaluate import Encoded, rank_all
from tmass.model.scoring import own_caption_pooled, score_rows
from tmass.metrics import best_caption_scores, metrics_from_ranks, t2v_ranks
from tmass.model.noise import counter_noise, keyed_noise, noise_table, row_keys
from tmass.model.tmass import TMASS

D, F = 32, 4


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = TMASS(ModelConfig(clip_arch="tiny", num_frames=F, transformer_dropout=0.0, **kw)).eval()
    with torch.no_grad():  # move the head off its identity init
        for p in list(m.pool_frames.parameters()) + list(m.radius.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    return m


def random_set(n_t=7, n_v=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    text_video = torch.tensor([0, 0, 1, 2, 2, 2, 3][:n_t])
    return Encoded(torch.randn(n_t, D, generator=g), torch.randn(n_v, F, D, generator=g), text_video,
                   [f"v{i}" for i in range(n_v)], {})


def scores_of(model, enc, rows, cfg, seed, *args, **kw):
    return score_rows(model, enc.text, enc.frames, rows, cfg, seed, *args, **kw)


def own_of(model, enc):
    return own_caption_pooled(model, enc.text, enc.frames, enc.text_video)


def head_state(model):
    sd = {f"pool_frames.{k}": v.double() for k, v in model.pool_frames.state_dict().items()}
    return sd | {f"radius.{k}": v.double() for k, v in model.radius.state_dict().items()}


@pytest.mark.parametrize("noise", ["per_text", "per_pair"])
@pytest.mark.parametrize("prior", ["uniform01", "normal"])
def test_scores_against_a_triple_loop(noise, prior):
    model = tiny(stochastic_prior=prior, stochastic_prior_std=0.5)
    enc, M, seed = random_set(), 5, 24
    cfg = EvalConfig(stochastic_trials=M, trial_noise=noise, eval_chunk=6)  # chunks of 2 texts x 3 videos
    got = scores_of(model, enc, torch.arange(7), cfg, seed)
    sd = head_state(model)
    for j in range(7):
        for i in range(4):
            if noise == "per_text":
                eps = keyed_noise((seed, "text"), [j], M, D, prior, 0.5)[0].double()
            else:
                keys = row_keys((seed, "pair"), torch.tensor([j]), torch.tensor([i]))
                eps = counter_noise(keys, noise_table((seed, "pair"), M, D), prior, 0.5)[0].double()
            expected = ref.eval_score(enc.text[j].double(), enc.frames[i].double(), sd, list(eps))
            assert abs(got[j, i].item() - expected) < 2e-5, (j, i, got[j, i].item(), expected)


def test_deterministic_text_scores():
    model, enc = tiny(deterministic_text=True), random_set()
    got = scores_of(model, enc, torch.arange(7), EvalConfig(), 24)
    sd = head_state(model)
    for j in range(7):
        for i in range(4):
            expected = ref.cos(enc.text[j].double(), ref.pool_one(enc.text[j].double(), enc.frames[i].double(), sd))
            assert abs(got[j, i].item() - expected) < 1e-5


def test_scores_do_not_depend_on_chunks_or_row_blocks():
    model, enc = tiny(), random_set()
    for noise in ("per_text", "per_pair"):
        whole = scores_of(model, enc, torch.arange(7), EvalConfig(stochastic_trials=6, trial_noise=noise,
                                                                   eval_chunk=10**6), 24)
        for chunk in (1, 5, 12):
            cfg = EvalConfig(stochastic_trials=6, trial_noise=noise, eval_chunk=chunk)
            parts = torch.cat([scores_of(model, enc, torch.arange(a, b), cfg, 24) for a, b in ((0, 3), (3, 7))])
            torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prior", ["uniform01", "normal"])
def test_compiled_per_pair_scorer_matches_the_checked_eager_one(prior):
    """--eval_compile yes (the kernel that hashes eps where it is used, with padded chunks) against the eager
    scores, which test_scores_against_a_triple_loop checks against float64 loops; N_t != N_v, ragged chunks."""
    model = tiny(stochastic_prior=prior, stochastic_prior_std=0.5)
    g = torch.Generator().manual_seed(5)
    n_t, n_v = 23, 17
    enc = Encoded(torch.randn(n_t, D, generator=g), torch.randn(n_v, F, D, generator=g), torch.arange(n_t) % n_v,
                  [f"v{i}" for i in range(n_v)], {})
    kw = dict(stochastic_trials=5, trial_noise="per_pair", eval_chunk=40)  # compiled: 6 x 6 chunks, padded
    eager = scores_of(model, enc, torch.arange(n_t), EvalConfig(eval_compile="no", **kw), 24)
    timings = {}
    compiled = scores_of(model, enc, torch.arange(n_t), EvalConfig(eval_compile="yes", **kw), 24, timings=timings)
    assert timings["compiled"] is True
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=2e-6)
    assert not torch.allclose(compiled[:, :-1], compiled[:, 1:])  # not a constant that would match by chance


def test_a_failing_compile_falls_back_or_stops_with_the_fix(monkeypatch, capsys):
    import tmass.model.scoring as ev

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setitem(ev._compiled, "per_pair_best", broken)
    model, enc = tiny(), random_set()
    kw = dict(stochastic_trials=4, trial_noise="per_pair")
    eager = scores_of(model, enc, torch.arange(7), EvalConfig(eval_compile="no", **kw), 24)
    monkeypatch.setattr(ev, "AUTO_COMPILE_PAIRS", 1)  # auto: compile this tiny set, and fall back
    timings = {}
    got = scores_of(model, enc, torch.arange(7), EvalConfig(eval_compile="auto", **kw), 24, timings=timings)
    assert torch.equal(got, eager) and timings["compiled"] is False
    assert "torch.compile failed (RuntimeError)" in capsys.readouterr().err
    with pytest.raises(TmassError, match="install a C.. compiler .g... for CPU runs, or pass --eval_compile no"):
        scores_of(model, enc, torch.arange(7), EvalConfig(eval_compile="yes", **kw), 24)


def test_metrics_against_hand_made_ranks_with_ties_and_several_captions():
    # 5 texts of 3 videos: texts 0,1 -> video 0; text 2 -> video 1; texts 3,4 -> video 2
    s = torch.tensor([[0.9, 0.9, 0.1],   # tie with the right one: rank 0 (ties count for the query)
                      [0.2, 0.5, 0.7],   # rank 2
                      [0.3, 0.3, 0.8],   # rank 1
                      [0.1, 0.2, 0.3],   # rank 0
                      [0.6, 0.7, 0.5]], dtype=torch.float64)  # rank 2
    right = torch.tensor([0, 0, 1, 2, 2])
    ranks = t2v_ranks(s, right)
    assert ranks.tolist() == ref.ranks_by_hand(s.tolist(), right.tolist()) == [0, 2, 1, 0, 2]
    m = metrics_from_ranks(ranks)
    assert m["R@1"] == 40.0 and m["R@5"] == 100.0 and m["MdR"] == 2.0 and m["MnR"] == pytest.approx(2.0)
    # v2t: candidate video k for query video i scores max over k's captions of s[caption, i]
    best = best_caption_scores(s, right, torch.arange(3))
    assert best.tolist() == [[0.9, 0.9, 0.7], [0.3, 0.3, 0.8], [0.6, 0.7, 0.5]]
    v2t = (best > best.diagonal()[None, :]).sum(dim=0)
    # query 0: own 0.9 vs 0.3, 0.6 -> 0; query 1: own 0.3 vs 0.9, 0.7 -> 2; query 2: own 0.5 vs 0.7, 0.8 -> 2
    assert v2t.tolist() == [0, 2, 2]
    assert metrics_from_ranks(torch.tensor([0, 1, 1, 3]))["MdR"] == 2.0


def test_upstream_protocol_shows_the_leak_and_refuses_multi_caption_sets():
    """With one caption per video: a pooling that depends on the text gives other metrics under the leaky
    protocol; a pooling that ignores the text (uniform attention) gives the same ones."""
    g = torch.Generator().manual_seed(3)
    n = 12
    enc = Encoded(torch.randn(n, D, generator=g), torch.randn(n, F, D, generator=g), torch.arange(n),
                  [str(i) for i in range(n)], {})
    cfg = EvalConfig(stochastic_trials=4)
    results = {}
    for name, model in (("text-dependent", tiny()), ("text-blind", tiny())):
        if name == "text-blind":
            with torch.no_grad():
                model.pool_frames.cross_attn.q_proj.weight.zero_()
                model.pool_frames.cross_attn.q_proj.bias.zero_()
        free = scores_of(model, enc, torch.arange(n), cfg, 24)
        leaky = scores_of(model, enc, torch.arange(n), cfg, 24, own_of(model, enc))
        results[name] = (metrics_from_ranks(t2v_ranks(free, torch.arange(n))),
                         metrics_from_ranks(t2v_ranks(leaky, torch.arange(n))), free, leaky)
    model = tiny()
    sd = head_state(model)
    big = Encoded(torch.randn(70, D, generator=g), torch.randn(70, F, D, generator=g), torch.arange(70), [], {})
    own = own_of(model, big)  # two blocks of videos: 64 and 6
    for i in (0, 1, 63, 64, 69):  # psi(v_i | t_i) / |psi|, float64 loop
        expected = ref.pool_one(big.text[i].double(), big.frames[i].double(), sd)
        torch.testing.assert_close(own[i].double(), expected / expected.norm(), rtol=1e-4, atol=1e-5)
    free_m, leaky_m, free, leaky = results["text-dependent"]
    assert not torch.allclose(free, leaky) and free_m != leaky_m
    _, _, free_b, leaky_b = results["text-blind"]
    torch.testing.assert_close(free_b, leaky_b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="N_t = 7 texts for N_v = 4"):
        own_of(tiny(), random_set())


@pytest.mark.parametrize("n", [1, 2, 19, 20, 1000])
def test_median_rank_is_numpys_median(n):
    """MdR = np.median(ranks) + 1: for an even count, the mean of the two middle ranks (upstream's metric)."""
    g = torch.Generator().manual_seed(n)
    ranks = torch.randint(0, 7, (n,), generator=g)
    assert metrics_from_ranks(ranks)["MdR"] == float(np.median(ranks.numpy())) + 1
    assert metrics_from_ranks(torch.tensor([0, 0, 1, 1]))["MdR"] == 1.5  # the lower median would say 1.0


def upstream_t2v_v2t_by_loops(sims):
    """Upstream's t2v and v2t metrics (one caption per video) written with numpy: a double argsort of each row
    (columns, for v2t) in descending order, the diagonal's place as the rank, np.median for MdR."""
    def metrics(s):
        ranks = np.argsort(np.argsort(-s, axis=1), axis=1).diagonal()
        return {"R@1": 100 * np.mean(ranks < 1), "R@5": 100 * np.mean(ranks < 5), "MdR": np.median(ranks) + 1}
    return metrics(sims), metrics(sims.T)


@pytest.mark.parametrize("dsl", [False, True])
def test_upstream_protocol_with_deterministic_text_is_upstreams_procedure(dsl):
    """--eval_protocol upstream --deterministic_text (the X-Pool baseline): upstream's selection and scoring with
    one trial of zero noise, sims[j, i] = cos(t_j, psi(v_i | t_i)), as a float64 loop, N = 20 (even: MdR is a
    mean of two ranks), with and without DSL (numpy's softmax over the queries)."""
    model = tiny(deterministic_text=True)
    g = torch.Generator().manual_seed(11)
    n = 20
    enc = Encoded(torch.randn(n, D, generator=g), torch.randn(n, F, D, generator=g), torch.arange(n),
                  [str(i) for i in range(n)], {})
    sd = head_state(model)
    own = [ref.pool_one(enc.text[i].double(), enc.frames[i].double(), sd) for i in range(n)]
    sims = np.array([[ref.cos(enc.text[j].double(), own[i]) for i in range(n)] for j in range(n)])
    if dsl:
        e = np.exp(100 * (sims - sims.max(axis=0, keepdims=True)))
        sims = sims * e / e.sum(axis=0, keepdims=True)
    want_t2v, want_v2t = upstream_t2v_v2t_by_loops(sims)
    got = rank_all(model, enc, EvalConfig(eval_protocol="upstream", dsl=dsl), 24)
    assert got["leaky"] and "LEAKY" in got["protocol"] and got["trials"] == 0
    for name, want in (("t2v", want_t2v), ("v2t", want_v2t)):
        for k, v in want.items():
            assert got[name][k] == pytest.approx(v, abs=1e-9), (name, k, got[name][k], v)
    free = rank_all(model, enc, EvalConfig(dsl=dsl), 24)
    assert free["t2v"] != got["t2v"]  # the leak changes the numbers


def run_eval(args, world=1):
    from _procs import clean_env

    env = clean_env(DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    if world == 1:
        cmd = [sys.executable, os.path.join(REPO, "launch", "eval.py")]
    else:
        from _procs import free_port
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(world),
               "--master_port", str(free_port()),
               os.path.join(REPO, "launch", "eval.py")]
    p = subprocess.run(cmd + args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.parametrize("noise", ["per_text", "per_pair"])
def test_world_sizes_and_chunks_give_identical_metrics(synthetic_shards, exported, tmp_path, noise):
    """launch/eval.py as one process and through `deepspeed --num_gpus 2`, and two chunk sizes."""
    common = ["--checkpoint", str(exported), "--test_shards", str(synthetic_shards / "test-{000000..000001}.tar"),
              "--input_res", "32", "--num_workers", "1", "--eval_batch_size", "2", "--stochastic_trials", "4",
              "--trial_noise", noise]
    out = {}
    for name, world, chunk in (("w1", 1, "100000"), ("w1c", 1, "3"), ("w2", 2, "7")):
        path = tmp_path / f"{name}.json"
        text = run_eval(common + ["--eval_chunk", chunk, "--results", str(path)], world)
        out[name] = json.loads(path.read_text())
        assert "t2v" in text and "v2t" in text
    for name in ("w1c", "w2"):
        assert out[name]["t2v"] == out["w1"]["t2v"] and out[name]["v2t"] == out["w1"]["v2t"]
    r = out["w2"]
    assert r["num_texts"] == 21 and r["num_videos"] == 7 and r["world_size"] == 2 and not r["leaky"]
    assert r["skipped"]["ok"] == 7


def test_deterministic_evaluation_of_a_t_mass_model(synthetic_shards, exported, tmp_path):
    """--deterministic_text at evaluation scores a T-MASS model with t alone: no trials, so the scores do not
    move with the seed or the number of trials, where the stochastic scores do."""
    from tmass.config import parse_config
    from tmass.evaluate import run

    def sims(*flags):
        path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npy"
        r = run(parse_config(["--checkpoint", str(exported), "--test_shards", str(synthetic_shards / "test-*.tar"),
                              "--num_workers", "0", "--results", str(tmp_path / "r.json"), "--save_sims", str(path),
                              *flags]))
        return r, np.load(path)

    r1, a = sims("--deterministic_text", "--seed", "1", "--stochastic_trials", "2")
    r2, b = sims("--deterministic_text", "--seed", "2", "--stochastic_trials", "5")
    assert r1["deterministic_text"] and r1["trials"] == 0 and np.array_equal(a, b)
    r3, c = sims("--seed", "1", "--stochastic_trials", "2")
    r4, d = sims("--seed", "2", "--stochastic_trials", "2")
    assert not r3["deterministic_text"] and r3["trials"] == 2 and not np.array_equal(c, d)
    assert a.shape == c.shape == (21, 7)


def test_eval_cli_errors(synthetic_shards, exported, tmp_path):
    p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "eval.py"), "--checkpoint", str(exported),
                        "--test_shards", str(synthetic_shards / "test-000000.tar"), "--eval_protocol", "upstream",
                        "--input_res", "32", "--num_workers", "0", "--results", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode != 0 and "one caption per video" in p.stderr
    p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "eval.py"), "--checkpoint", str(exported),
                        "--test_shards", str(synthetic_shards / "test-000000.tar"), "--num_frames", "6",
                        "--input_res", "32"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode != 0 and "--num_frames 6 (the checkpoint has 4)" in p.stderr
    p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "eval.py"), "--checkpoint", str(exported),
                        "--test_shards", str(synthetic_shards / "test-000000.tar"), "--input_res", "64"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode != 0 and f"--input_res 64, but the model ({exported}) takes 32 x 32 frames" in p.stderr


@pytest.mark.parametrize("world", [1, 2, 3])
def test_encode_puts_every_caption_beside_its_own_video(synthetic_shards, tmp_path, world):
    """Against the shards themselves: row j of the gathered texts is a caption of video text_video[j], for 1, 2
    and 3 ranks x 2 workers over 2 shards (so ranks and workers interleave the videos)."""
    import torch.multiprocessing as mp
    import webdataset as wds

    import _dist_workers
    from _procs import free_port
    from tmass.data.tokenizer import load_tokenizer

    shards = [str(synthetic_shards / "test-000000.tar"), str(synthetic_shards / "test-000001.tar")]
    tok_dir = str(synthetic_shards / "tokenizer")
    mp.spawn(_dist_workers.encode_worker, args=(world, free_port(), shards, tok_dir, str(tmp_path)), nprocs=world)
    got = torch.load(tmp_path / f"enc{world}.pt")
    tok = load_tokenizer(tok_dir)
    captions = {s["__key__"]: json.loads(s["json"])["captions"]
                for s in wds.WebDataset(shards, shardshuffle=False, nodesplitter=lambda x: x)}
    assert got["keys"] == [f"synth_test_{i:06d}" for i in range(7)]
    assert len(got["text"]) == 21
    for j, row in enumerate(got["text"].long().tolist()):
        key = got["keys"][int(got["text_video"][j])]
        ids = [(tok(c)["input_ids"] + [tok.pad_token_id] * 8)[:8] for c in captions[key]]
        assert row in ids, (j, key)
    assert got["text_video"].tolist() == sorted(got["text_video"].tolist())


def test_eval_refuses_what_it_cannot_score_honestly(synthetic_shards, exported, tmp_path, monkeypatch, capsys):
    """No weights: refused unless --random_init says so, and then labelled; a missing test shard, a shard cut
    short, and more skipped samples than --max_bad_fraction are errors, not metrics on a subset."""
    import shutil

    import webdataset as wds

    from tmass.config import parse_config
    from tmass.data.stream import TooManyBadSamples
    from tmass.evaluate import run

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    test = ["--test_shards", str(synthetic_shards / "test-{000000..000001}.tar"), "--num_workers", "0",
            "--input_res", "32", "--stochastic_trials", "2"]
    with pytest.raises(TmassError, match="no trained weights to evaluate.*--random_init"):
        run(parse_config(test + ["--exp_name", "X", "--DSL"]))
    with pytest.raises(TmassError, match="--load_epoch -1: no tmass run at"):
        run(parse_config(test + ["--exp_name", "X", "--load_epoch", "-1", "--output_dir", str(work)]))
    assert os.listdir(work) == []  # nothing scored, nothing written
    with pytest.raises(TmassError, match="1 of 3 test shard.s. missing, e.g. .*test-000002.tar"):
        run(parse_config(["--test_shards", str(synthetic_shards / "test-{000000..000002}.tar"),
                          "--checkpoint", str(exported)]))
    random = run(parse_config(test + ["--random_init", "--clip_arch", "tiny", "--num_frames", "4"]))
    assert random["model"]["kind"] == "random" and "RANDOM WEIGHTS" in capsys.readouterr().out
    assert os.listdir(work) == ["eval_results_random_init.json"]

    tok = str(synthetic_shards / "tokenizer")
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(synthetic_shards / "test-000000.tar", cut / "test-000000.tar")
    data = (synthetic_shards / "test-000001.tar").read_bytes()
    (cut / "test-000001.tar").write_bytes(data[:len(data) // 2 + 100])  # cut mid-member
    with pytest.raises(TooManyBadSamples, match="could not be read to the end.*test-000001.tar"):
        run(parse_config(["--test_shards", str(cut / "test-{000000..000001}.tar"), "--checkpoint", str(exported),
                          "--num_workers", "0", "--stochastic_trials", "2", "--tokenizer", tok]))

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("test-000000.tar", "test-000001.tar"):
        shutil.copy(synthetic_shards / name, bad / name)
    with wds.TarWriter(str(bad / "test-000002.tar")) as w:  # 3 samples with captions and no video
        for i in range(3):
            w.write({"__key__": f"novideo{i}", "json": {"captions": ["a caption"]}})
    args = ["--test_shards", str(bad / "test-{000000..000002}.tar"), "--checkpoint", str(exported),
            "--num_workers", "0", "--stochastic_trials", "2", "--results", str(tmp_path / "r.json"), "--tokenizer", tok]
    with pytest.raises(TooManyBadSamples, match="3 of 10 samples were skipped .no video bytes: 3.*test-000002"):
        run(parse_config(args))
    capsys.readouterr()
    ok = run(parse_config(args + ["--max_bad_fraction", "0.5"]))
    assert ok["num_videos"] == 7 and "7 videos (3 of 10 samples skipped)" in capsys.readouterr().out
