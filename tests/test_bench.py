"""The benchmarks run (tiny settings), so that they never rot. Their timings are not asserted; what they count
(FLOPs, parameters, bytes) is checked against independent counts."""
import json
import os
import subprocess
import sys

import pytest
import torch

from _procs import clean_env
from conftest import REPO


def test_bench_build_shards_runs(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "build_shards.py"), "--num", "2", "--seconds", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["workers"] for r in rows] == [1, 2] and all(r["videos"] == 2 for r in rows)
    assert "videos/s" in p.stdout


def test_bench_model_runs_tiny(tmp_path):
    out = tmp_path / "m.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "model.py"), "--tiny", "--batch", "2",
                        "--frames", "4", "--steps", "1", "--json", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())
    assert [(r["precision"], r["checkpointing"]) for r in rows] == [("fp32", False), ("fp32", True),
                                                                     ("bf16", False), ("bf16", True)]
    assert "clips/s" in p.stdout


def test_bench_loader_runs(tmp_path):
    out = tmp_path / "l.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "loader.py"), "--num", "2", "--seconds", "1",
                        "--clips", "4", "--batch", "2", "--upstream_clips", "2", "--frames", "4", "--size", "64",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rates = json.loads(out.read_text())["clips_per_s_per_core"]
    assert set(rates) == {"shards", "upstream raw", "upstream precompressed"} and all(v > 0 for v in rates.values())


def test_bench_eval_runs_small(tmp_path):
    out = tmp_path / "e.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "eval.py"), "--sizes", "40", "--upstream_max", "40",
                        "--trials", "3", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())
    cores = os.cpu_count() or 1
    per_noise = [("tmass", 1, cores), ("tmass", 2, max(1, cores // 2)), ("tmass", 1, max(1, cores // 2))]
    assert [(r["method"], r["world"], r["threads"]) for r in rows] == [("upstream", 1, cores)] + per_noise * 2
    assert "vs (a)" in p.stdout and "2 ranks x" in p.stdout and "x floor" in p.stdout
    tm = [r for r in json.loads(out.read_text()) if r["method"] == "tmass"]
    assert tm and all(r["x_floor"] > 0 for r in tm)


def test_bench_gpu_train_runs_on_cpu_tiny(tmp_path):
    out = tmp_path / "g.json"
    # --no_compile: the compiled rows cost a minute of compiling here; compiling the towers is checked against
    # eager in tests/test_model.py
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_train.py"), "--cpu", "--tiny", "--steps", "1",
                        "--no_compile", "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env=clean_env(DS_ACCELERATOR="cpu"))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [(t["zero"], t["checkpointing"], t["compile"], t["attention"], t["adamw"]) for t in r["train"]] == [
        (1, False, "no", "sdpa", "auto"), (1, True, "no", "sdpa", "auto"), (2, False, "no", "sdpa", "auto"),
        (2, True, "no", "sdpa", "auto"), (2, False, "no", "eager", "auto"), (2, False, "no", "sdpa", "foreach")]
    assert r["train"][-1]["batch"] == r["train"][2]["batch"]  # one option changed, at the default's batch
    assert all(t["flops_per_step"] > 0 and t["clips_per_s"] > 0 for t in r["train"])
    assert r["upstream"]["clips_per_s"] > 0 and r["eval"]["n"] == 100
    assert r["eval_per_pair"]["noise"] == "per_pair" and r["loader"]["clips_per_s"] > 0
    assert "GFLOP, counted from the shapes" in p.stdout


def test_memory_table_counts_the_real_model(tmp_path):
    """bench/memory.py's parameter count (built on the meta device) against a materialised model, its largest
    layer against the token embedding's shape, and its ZeRO rows against the formulas it prints."""
    from tmass.config import ModelConfig
    from tmass.model.clip import clip_config
    from tmass.model.tmass import TMASS

    out = tmp_path / "m.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "memory.py"), "--archs", "tiny", "--nodes", "1",
                        "--gpus_per_node", "2", "--json", str(out)], capture_output=True, text=True, timeout=300,
                       env=clean_env(DS_ACCELERATOR="cpu"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["setting"]: r for r in json.loads(out.read_text())}
    psi = sum(p.numel() for p in TMASS(ModelConfig(clip_arch="tiny")).parameters())
    text = clip_config("tiny").text_config
    assert rows["ZeRO-2"]["params"] == psi
    assert rows["ZeRO-2"]["largest_layer_params"] == text.vocab_size * text.hidden_size
    assert rows["ZeRO-1"]["gpu_bytes"] == 4 * psi + 16 * psi // 2
    assert rows["ZeRO-2"]["gpu_bytes"] == 2 * psi + 18 * psi // 2
    assert rows["ZeRO-3"]["gpu_bytes"] == 4 * text.vocab_size * text.hidden_size + 18 * psi // 2
    assert rows["ZeRO-3 + offload all"]["gpu_bytes"] < rows["ZeRO-3"]["gpu_bytes"]
    assert "GPU GB" in p.stdout


@pytest.mark.parametrize("n, trials", [(40, 3), (64, 20)])
def test_eval_bench_flop_count_matches_torch_counter(n, trials):
    """bench/eval.py's floor counts the scoring's products from the shapes; torch's FlopCounterMode counts the
    matmuls that rank_all really runs (eager, per_text)."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, os.path.join(REPO, "bench"))
    from eval import Head, features, scoring_flops

    from tmass.config import EvalConfig
    from tmass.evaluate import Encoded, rank_all

    t, frames = features(n)
    with FlopCounterMode(display=False) as counter:
        rank_all(Head(), Encoded(t, frames, torch.arange(n), [], {}),
                 EvalConfig(stochastic_trials=trials, trial_noise="per_text", eval_compile="no"), 24)
    assert scoring_flops(n, n, trials) == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_gpu_bench_flop_count_matches_torch_counter():
    """The MFU's FLOPs come from the shapes; torch's FlopCounterMode counts the executed matmuls of one forward
    (eager attention, so that the attention products are visible to it)."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, os.path.join(REPO, "bench"))
    from gpu_train import make_batch, new_model, step_flops

    for arch, batch in (("tiny", 3), ("small", 2)):
        model = new_model(arch, 4, False)
        model.clip.set_attn_implementation("eager")
        ids, mask, video, eps = make_batch(model, batch, 4, torch.device("cpu"))
        with FlopCounterMode(display=False) as counter:
            model(ids, mask, video, eps)
        assert step_flops(model, batch, 4, ids.shape[1]) / 3 == pytest.approx(counter.get_total_flops(), rel=0.01)


def _bench_eval():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_eval", os.path.join(REPO, "bench", "eval.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_upstream_baseline_regroups_to_the_leaky_score():
    """bench/eval.py's (a), steps 4 and 5 (per_video_id, upstream_sims), computes what the
    upstream code computes: sims[b, m, i] = cos(t(b's m-th caption | i), V[i, i's own m-th caption]), NaN where a
    video has fewer captions. Here with 1 to 3 captions per video, against a float64 loop; then upstream's t2v ranks
    against counting."""
    be = _bench_eval()
    g = torch.Generator().manual_seed(0)
    vid_ids = [0, 0, 1, 2, 2, 2, 3]  # texts' videos: 4 videos, 7 texts
    n_v, n_t, dim = 4, len(vid_ids), 8
    chosen, v = torch.randn(n_v, n_t, dim, generator=g), torch.randn(n_v, n_t, dim, generator=g)
    sims = be.upstream_sims(be.per_video_id(chosen, vid_ids), be.per_video_id(v, vid_ids))
    caps = [[j for j, x in enumerate(vid_ids) if x == b] for b in range(n_v)]
    assert sims.shape == (n_v, 3, n_v)
    for b in range(n_v):
        for m in range(3):
            for i in range(n_v):
                if m < len(caps[b]) and m < len(caps[i]):
                    x, y = chosen[i, caps[b][m]].double(), v[i, caps[i][m]].double()
                    assert sims[b, m, i].item() == pytest.approx((x @ y / (x.norm() * y.norm())).item(), abs=1e-6)
                else:
                    assert torch.isnan(sims[b, m, i])
    one = be.upstream_sims(be.per_video_id(chosen[:, :n_v], list(range(n_v))),
                           be.per_video_id(v[:, :n_v], list(range(n_v))))  # one caption each
    ranks = be.upstream_t2v_ranks(one)
    assert ranks.tolist() == [int((one[b, 0] > one[b, 0, b]).sum()) for b in range(n_v)]


def test_upstream_baseline_stochastic_text_matches_the_model_radius():
    """(a)'s stochastic module, called as upstream calls it (t repeated over the frames, the tiled video, an F x F
    product averaged over the repeated axis), gives t + u R with R = exp(W S + b) of tmass's own radius, S_k =
    cos(t, f_k), for the same uniform draw u."""
    from tmass.model.stochastic import paired_cosines

    be = _bench_eval()
    head = be.Head()
    t, frames = be.features(5)
    frames_rep = frames[2].unsqueeze(0).tile((5, 1, 1))
    torch.manual_seed(3)
    got = be.upstream_stochastic(head.radius, t, frames_rep)
    torch.manual_seed(3)
    u = torch.rand_like(t)
    with torch.no_grad():
        want = t.double() + u.double() * head.radius(paired_cosines(t.double(), frames_rep.double())).double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_bench_search_runs_and_all_candidates_give_the_exhaustive_ranks(tmp_path, synthetic_shards, exported):
    """(a) on the tiny model and the synthetic test split: with every video a candidate (K = 7), the two stages'
    recall is the exhaustive evaluation's, whatever stage 1 does; (b) a synthetic index of 300 videos: its size on
    disk is N (F + 1) D float16 values plus the metadata."""
    out = tmp_path / "s.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "search.py"), "--run", str(exported), "--shards",
                        str(synthetic_shards / "test-*.tar"), "--candidates", "2,7", "--sizes", "300", "--repeats",
                        "1", "--json", str(out)], capture_output=True, text=True, timeout=600, env=clean_env(),
                       cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    rows = {x["method"]: x for x in r["quality"]}
    everything = rows["two stages, K = 7"]
    assert {k: v for k, v in everything.items() if k != "method"} == {
        k: v for k, v in rows["exhaustive (tmass-eval)"].items() if k != "method"}
    (scale,) = r["scale"]
    feature_bytes = 300 * 13 * 512 * 2
    assert scale["videos"] == 300 and feature_bytes < scale["index_bytes"] < feature_bytes + 100_000


def test_bench_mass_runs_and_an_untrained_radius_is_its_init(tmp_path, synthetic_shards, exported):
    """At its initialisation R = e^S on the first F dims and 1 on the other D - F, so its mean over D lies
    between (D - F + F/e) / D and (D - F + F e) / D; and cos(t_s, t) is a cosine."""
    import math

    out = tmp_path / "m.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "mass.py"), str(exported),
                        str(synthetic_shards / "test-*.tar"), "--json", str(out)], capture_output=True, text=True,
                       timeout=600, env=clean_env(), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    d, f = r["dim"], 4
    assert r["texts"] == 21 and (d - f + f / math.e) / d < r["mean_radius"] < (d - f + f * math.e) / d
    assert -1 <= r["cos_ts_t"] <= 1 and r["mass_norm"] > 0
