"""The benchmarks run (tiny settings), so that they never rot. Their figures are not asserted."""
import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_build_shards_runs(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "build_shards.py"), "--num", "2", "--seconds", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["workers"] for r in rows] == [1, 2] and all(r["videos"] == 2 for r in rows)
    assert "videos/s" in p.stdout
