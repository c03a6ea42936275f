"""The shard builder end to end: corrupt inputs skipped and listed, shards independent of the number of
workers, resume after kill -9, and shards that tar, webdataset and decord read back."""
import io
import json
import os
import random
import signal
import subprocess
import sys

import decord
import pytest
import webdataset as wds

from _media import make_clip, no_video_stream, undecodable_clip
from conftest import REPO
from tmass.shards.cli import main

GOOD = {  # name -> (width, height, fps, seconds, codec, container)
    "a.mp4": (320, 240, 30, 3, "libx264", "mp4"), "b.mp4": (640, 360, 25, 2, "libx264", "mp4"),
    "c.avi": (160, 120, 10, 2, "mpeg4", "avi"), "d.mp4": (200, 150, 12, 1, "libx264", "mp4"),
    "e.mp4": (256, 144, 30, 2, "libx264", "mp4"), "f.mp4": (300, 300, 15, 3, "libx264", "mp4"),
    "g.mp4": (120, 90, 2, 3, "libx264", "mp4"),
}
BAD = {"missing.mp4": "missing file", "zero.mp4": "empty file", "truncated.mp4": "truncated",
       "garbage.mp4": "not a video", "undecodable.mp4": "no decodable frame", "nostream.mp4": "no video stream",
       "nocaption.mp4": "empty caption"}
TRUNCATED_AS = {"truncated", "not a video", "no decodable frame", "decode error"}  # depends on where the cut is


def reasons(m):
    got = {os.path.basename(f["path"]): f["reason"] for f in m["failures"]}
    assert got.get("truncated.mp4") in TRUNCATED_AS
    return {**got, "truncated.mp4": "truncated"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    vids = d / "videos"
    vids.mkdir()
    for name, (w, h, fps, secs, codec, fmt) in GOOD.items():
        (vids / name).write_bytes(make_clip(w, h, fps, secs, codec, fmt))
    (vids / "zero.mp4").write_bytes(b"")
    (vids / "truncated.mp4").write_bytes(make_clip(320, 240, 30, 3)[:5000])
    # seeded: about 0.6% of random blobs probe as "no video stream" (or even decode)
    (vids / "garbage.mp4").write_bytes(random.Random(0).randbytes(20000))
    (vids / "undecodable.mp4").write_bytes(undecodable_clip())
    (vids / "nostream.mp4").write_bytes(no_video_stream())
    (vids / "nocaption.mp4").write_bytes(make_clip(160, 120, 10, 1))
    rows = ["video,caption"]
    names = list(GOOD) + list(BAD)
    names.sort()
    for n in names:
        caps = ["   "] if n == "nocaption.mp4" else [f"caption one of {n}", f"caption two of {n}"]
        rows += [f"{n},{c}" for c in caps]
    (d / "list.csv").write_text("\n".join(rows) + "\n")
    return d


def args(corpus, out, *extra):
    return ["--source", "csv", "--anno", str(corpus / "list.csv"), "--videos_dir", str(corpus / "videos"),
            "--splits", "train", "--out", str(out), "--max_count", "2", "--no_progress", "--max_failed_fraction", "1",
            *extra]


def shard_bytes(out):
    return {n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n.endswith(".tar")}


def assert_same_shards(a, b):
    """Byte-identical shards; a difference is reported by tar member, so that a failure says what differs."""
    import tarfile

    for name, data in shard_bytes(a).items():
        other = shard_bytes(b)[name]
        if data != other:
            members = []
            for blob in (data, other):
                with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                    members.append({m.name: (m.size, m.mtime, tar.extractfile(m).read()) for m in tar.getmembers()})
            diff = {k: (members[0].get(k, (None,))[:2], members[1].get(k, (None,))[:2]) for k in
                    set(members[0]) | set(members[1]) if members[0].get(k) != members[1].get(k)}
            raise AssertionError(f"{name} differs in {diff}")
    assert sorted(shard_bytes(a)) == sorted(shard_bytes(b))


def manifest(out, split="train"):
    m = json.loads((out / f"{split}.json").read_text())
    for k in ("elapsed_s", "finished_at"):
        m.pop(k)
    return m


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_worker")
    assert main(args(corpus, out, "--workers", "1")) == 0
    return out


def test_bad_inputs_are_skipped_and_listed(built):
    m = manifest(built)
    assert m["totals"]["samples"] == len(GOOD) and m["totals"]["failed"] == len(BAD)
    assert reasons(m) == BAD
    assert m["totals"]["captions"] == 2 * len(GOOD)
    assert sum(s["count"] for s in m["shards"]) == len(GOOD) and all(s["count"] <= 2 for s in m["shards"])
    assert [s["bytes"] for s in m["shards"]] == [os.path.getsize(built / s["shard"]) for s in m["shards"]]
    assert not [n for n in os.listdir(built) if "partial" in n or "journal" in n]


def test_shards_do_not_depend_on_the_number_of_workers(corpus, built, tmp_path):
    assert main(args(corpus, tmp_path, "--workers", "2")) == 0
    assert_same_shards(tmp_path, built)
    assert manifest(tmp_path) == manifest(built)


def test_shards_read_back_with_tar_webdataset_and_decord(built):
    m = manifest(built)
    names = subprocess.run(["tar", "tf", str(built / m["shards"][0]["shard"])], check=True,
                           capture_output=True, text=True).stdout.split()
    assert names == ["a.json", "a.mp4", "a.txt", "b.json", "b.mp4", "b.txt"]
    urls = [str(built / s["shard"]) for s in m["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        vr = decord.VideoReader(io.BytesIO(sample["mp4"]), num_threads=1)
        assert len(vr) == meta["num_frames"]
        assert vr.get_batch(list(range(len(vr)))).shape == (meta["num_frames"], meta["height"], meta["width"], 3)
        assert sample["txt"].decode().split("\n") == meta["captions"]
        assert min(meta["width"], meta["height"]) <= 224 and meta["fps"] <= 3
        seen[sample["__key__"]] = meta
    assert sorted(seen) == sorted(n.split(".")[0] for n in GOOD)
    w, h, fps, secs, _, _ = GOOD["b.mp4"]
    assert (seen["b"]["width"], seen["b"]["height"], seen["b"]["num_frames"]) == (398, 224, 6)
    assert seen["b"]["orig"]["width"] == 640 and seen["b"]["orig"]["num_frames"] == fps * secs
    assert seen["g"]["fps"] == 2 and seen["g"]["num_frames"] == 6  # a 2 fps source keeps its rate
    assert seen["c"]["captions"] == ["caption one of c.avi", "caption two of c.avi"]


def test_no_transcode_keeps_bytes_but_probes(corpus, tmp_path):
    assert main(args(corpus, tmp_path, "--no_transcode")) == 0
    m = manifest(tmp_path)
    assert reasons(m) == BAD
    ds = {s["__key__"]: s for s in wds.WebDataset([str(tmp_path / s["shard"]) for s in m["shards"]],
                                                  shardshuffle=False, empty_check=False)}
    assert ds["a"]["mp4"] == (corpus / "videos" / "a.mp4").read_bytes()
    assert ds["c"]["avi"] == (corpus / "videos" / "c.avi").read_bytes()
    assert json.loads(ds["a"]["json"])["num_frames"] == 90


def _killed_run(corpus, out, kill_code):
    """Run the builder in a child that SIGKILLs itself at a chosen point, as a node failure would."""
    code = ("import os, signal, sys\n"
            "import tmass.shards.writer as w\n"
            f"{kill_code}\n"
            "from tmass.shards.cli import main\n"
            f"sys.exit(main({args(corpus, out, '--workers', '2')!r}))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr


KILL_MID_SHARD = """
orig = w.SplitWriter.add
n = [0]
def add(self, index, sample, failure):
    orig(self, index, sample, failure)
    n[0] += sample is not None
    if n[0] == 5:  # shards 0 and 1 committed, one sample into shard 2
        os.kill(os.getpid(), signal.SIGKILL)
w.SplitWriter.add = add
"""

KILL_AFTER_RENAME = """
orig = w._fsync_append
n = [0]
def append(path, record):
    if "shard" in record:
        n[0] += 1
        if n[0] == 2:  # shard 1 renamed to .tar, its journal line not yet written
            os.kill(os.getpid(), signal.SIGKILL)
    orig(path, record)
w._fsync_append = append
"""


@pytest.mark.parametrize("kill_code", [KILL_MID_SHARD, KILL_AFTER_RENAME], ids=["mid-shard", "after-rename"])
def test_rerun_after_kill_9_finishes_the_same_build(corpus, built, tmp_path, kill_code):
    _killed_run(corpus, tmp_path, kill_code)
    left = sorted(os.listdir(tmp_path))
    assert "train.journal.jsonl" in left and "train.json" not in left
    assert any(n.endswith(".partial") for n in left) or kill_code is KILL_AFTER_RENAME
    assert main(args(corpus, tmp_path, "--workers", "2")) == 0
    assert_same_shards(tmp_path, built)
    assert manifest(tmp_path) == manifest(built)
    keys = [k for s in wds.WebDataset([str(tmp_path / n) for n in shard_bytes(tmp_path)], shardshuffle=False,
                                      empty_check=False) for k in [s["__key__"]]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == len(GOOD)  # none duplicated, none lost


def test_rerun_of_a_finished_build_and_changed_options(corpus, built, capsys):
    before = shard_bytes(built)
    assert main(args(corpus, built, "--workers", "1")) == 0
    assert "already built" in capsys.readouterr().out
    assert shard_bytes(built) == before
    assert main(args(corpus, built, "--fps", "2")) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_exit_codes_nothing_written_and_max_failures(corpus, tmp_path, capsys):
    only_bad = tmp_path / "bad.csv"
    only_bad.write_text("video,caption\nmissing.mp4,x\ngarbage.mp4,y\n")
    a = ["--source", "csv", "--anno", str(only_bad), "--videos_dir", str(corpus / "videos"), "--no_progress"]
    assert main(a + ["--out", str(tmp_path / "o1"), "--max_failed_fraction", "1"]) == 1
    assert f"nothing was written for train: see the failures in {tmp_path / 'o1' / 'train.json'}" in \
        capsys.readouterr().err
    assert json.loads((tmp_path / "o1" / "train.json").read_text())["totals"]["failed"] == 2
    assert main(args(corpus, tmp_path / "o2", "--max_failures", "2")) == 1
    err = capsys.readouterr().err
    assert "more than --max_failures 2" in err and "rerun the same command" in err
    # the default --max_failed_fraction 0.2: 7 of the corpus's 14 inputs fail, so the build exits 1, naming them
    full = ["--source", "csv", "--anno", str(corpus / "list.csv"), "--videos_dir", str(corpus / "videos"),
            "--splits", "train", "--out", str(tmp_path / "o3"), "--no_progress", "--workers", "1"]
    assert main(full) == 1
    err = capsys.readouterr().err
    assert "train: 7 inputs failed, 7 of 14, more than --max_failed_fraction 0.2" in err and "missing.mp4" in err
    assert main(full) == 1  # a rerun of the finished build says so again, it does not pass as "already built"
    assert main(full + ["--max_failed_fraction", "0.5"]) == 0
    assert "already built (--overwrite rebuilds it)" in capsys.readouterr().out


def test_safe_keys_are_distinct_whatever_the_ids():
    from tmass.shards.build import safe_keys

    for ids in (["clip", "clip", "clip-2"], ["clip-2", "clip", "clip"], ["a.b", "a_b", "a b", "a/b"],
                ["x"] * 5 + ["x-3", "x-2"]):
        keys = safe_keys(ids)
        assert len(set(keys)) == len(ids), (ids, keys)
        assert all("." not in k and "/" not in k and " " not in k for k in keys)
    assert safe_keys(["clip", "clip", "clip-2"]) == ["clip", "clip-2", "clip-2-2"]


def test_videos_that_the_training_decoder_cannot_read_are_refused(tmp_path, capsys):
    """decord cannot decode some small frame sizes that PyAV reads (48 x 36 here): the builder checks every
    video with the decoder that training uses, so such a clip is a listed failure, not a bad training sample."""
    vids = tmp_path / "v"
    vids.mkdir()
    (vids / "small.mp4").write_bytes(make_clip(48, 36, 10, 2))
    (vids / "ok.mp4").write_bytes(make_clip(64, 48, 10, 2))
    (tmp_path / "l.csv").write_text("video,caption\nsmall.mp4,a small clip\nok.mp4,a fine clip\n")
    for extra in ([], ["--no_transcode"]):
        out = tmp_path / ("o" + "".join(extra))
        assert main(["--source", "csv", "--anno", str(tmp_path / "l.csv"), "--videos_dir", str(vids), "--out",
                     str(out), "--no_progress", "--workers", "1", "--max_failed_fraction", "0.5", *extra]) == 0
        m = json.loads((out / "train.json").read_text())
        assert m["totals"]["samples"] == 1 and [f["path"].endswith("small.mp4") for f in m["failures"]] == [True]
        assert m["failures"][0]["reason"].startswith("training decoder (decord)")


def test_annotation_errors_exit_2(tmp_path, capsys):
    assert main(["--source", "msrvtt", "--anno_dir", str(tmp_path), "--videos_dir", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--no_progress"]) == 2
    assert "MSRVTT_train.9k.csv: file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []  # no stray journal


def test_cli_script_runs_the_synthetic_corpus(tmp_path):
    """`python shards/build.py` as a user runs it: a small synthetic corpus, all three splits."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "shards", "build.py"), "--source", "synthetic",
                        "--out", str(tmp_path), "--num_train", "12", "--num_val", "3", "--num_test", "6",
                        "--max_count", "5", "--workers", "2", "--no_progress"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "train: 12 samples, 60 captions in 3 shards" in p.stdout
    for split, n in (("train", 12), ("val", 3), ("test", 6)):
        m = json.loads((tmp_path / f"{split}.json").read_text())
        assert m["totals"]["samples"] == n and m["totals"]["failed"] == 0
