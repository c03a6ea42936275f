"""The benchmarks run (tiny settings), so that they never rot. Their figures are not asserted."""
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
    assert "vs (a)" in p.stdout and "2 ranks x" in p.stdout


def test_bench_gpu_train_runs_on_cpu_tiny(tmp_path):
    out = tmp_path / "g.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_train.py"), "--cpu", "--tiny", "--steps", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env=clean_env(DS_ACCELERATOR="cpu"))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [(t["zero"], t["checkpointing"], t["compile"]) for t in r["train"]] == [
        (1, False, False), (1, True, False), (2, False, False), (2, True, False), (2, False, True), (2, True, True)]
    assert all(t["flops_per_step"] > 0 and t["clips_per_s"] > 0 for t in r["train"])
    assert r["upstream"]["clips_per_s"] > 0 and r["eval"]["n"] == 100 and r["eval_per_pair"]["noise"] == "per_pair" and r["loader"]["clips_per_s"] > 0
    assert "GFLOP, counted from the shapes" in p.stdout


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
