"""The streaming pipeline: exactly-once evaluation, equal batch counts, frame sampling, transforms, bad
and hanging inputs, and exact resume."""
import glob
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import webdataset as wds

from _media import make_clip, undecodable_clip
from tmass.errors import ConfigError
from tmass.data.shardlist import expand_shards, manifest_counts, samples_per_epoch
from tmass.data.stream import (DataConfig, EvalStream, SkipStats, StreamPosition, TooManyBadSamples,
                               TrainStream, check_bad_fraction, make_loader, reader_assignment)
from tmass.data.tokenizer import load_tokenizer
from tmass.data.transforms import crop_box, eval_transform, normalize, train_transform
from tmass.data.video import DecodeError, decode_frames, frame_indices


def shards(root, split):
    return sorted(glob.glob(str(root / f"{split}-*.tar")))


FRAMES, SEED = 4, 1  # the model's frames per video and the run's seed, as train() passes them


def cfg(**kw):
    base = dict(input_res=32, num_workers=0, shuffle_buffer=8, shuffle_initial=4, decode_timeout=5.0)
    return DataConfig(**(base | kw))


# ----------------------------------------------------------------------------- frame sampling
def test_uniform_indices_by_hand():
    # 30 frames, 12 segments: edges 0 2 5 7 10 12 15 17 20 22 25 27 30, middles of [a, b-1]
    assert frame_indices(30, 12, "uniform") == [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28]
    assert frame_indices(12, 12, "uniform") == list(range(12))
    assert frame_indices(5, 12, "uniform") == [0, 1, 2, 3, 4] + [4] * 7  # short clip: the last repeats
    assert frame_indices(1, 3, "uniform") == [0, 0, 0]


def test_rand_indices_stay_in_their_segments_and_survive_short_clips():
    rng = random.Random(0)
    for _ in range(50):
        idx = frame_indices(30, 12, "rand", rng)
        edges = [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27, 30]
        assert all(edges[k] <= i < max(edges[k] + 1, edges[k + 1] - 1) for k, i in enumerate(idx))
    assert frame_indices(3, 12, "rand", rng) == [0, 1, 2] + [2] * 9  # one-frame segments: no empty range crash
    with pytest.raises(DecodeError):
        frame_indices(0, 12, "uniform")


def test_decode_picks_the_sampled_frames():
    data = make_clip(64, 48, fps=10, seconds=3)  # the square moves right: x grows with the frame index
    frames = decode_frames(data, 6, "uniform")
    assert frames.shape == (6, 48, 64, 3) and frames.dtype == np.uint8
    xs = [np.nonzero(f.mean(axis=2) > 130)[1].mean() for f in frames]
    assert all(a < b for a, b in zip(xs, xs[1:]))


# ----------------------------------------------------------------------------- transforms
def test_same_crop_and_flip_on_every_frame():
    g = np.random.default_rng(0)
    base = g.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    frames = np.stack([base] * 5)
    for seed in range(10):
        out = train_transform(frames, 32, random.Random(seed))
        assert out.shape == (5, 3, 32, 32) and out.dtype == torch.uint8
        assert all(torch.equal(out[0], out[k]) for k in range(5))
    # and the flip really happens for some seeds: compare with the unflipped crop of the same box
    flips = 0
    for seed in range(20):
        rng = random.Random(seed)
        out = train_transform(frames, 32, rng)
        top, left, h, w = crop_box(48, 64, random.Random(seed))
        plain = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2)[:, :, top:top + h,
                                                left:left + w], size=(32, 32), mode="bilinear", antialias=True)
        flips += torch.equal(out, plain.flip(-1)) and not torch.equal(out, plain)
    assert 3 < flips < 17


def test_crop_box_area_and_aspect():
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w = crop_box(360, 640, rng)
        assert 0 <= top and top + h <= 360 and 0 <= left and left + w <= 640
        assert 0.45 * 360 * 640 <= h * w <= 360 * 640 and 0.7 <= w / h <= 1.4


def test_eval_transform_resizes_short_side_and_centre_crops():
    frames = np.zeros((2, 48, 96, 3), np.uint8)
    frames[:, :, 40:56] = 255  # a bright band at the centre of the width
    out = eval_transform(frames, 32)
    assert out.shape == (2, 3, 32, 32)
    col = out[0, 0].float().mean(dim=0)
    assert col[12:20].min() > 200 and col[:4].max() < 30 and col[-4:].max() < 30
    x = normalize(out)
    assert x.dtype == torch.float32 and abs(x[0, 0, 0, 0].item() - (0 - 0.48145466) / 0.26862954) < 1e-5


# ----------------------------------------------------------------------------- shards, counts, tokenizer
def test_urls_and_manifest_counts(synthetic_shards):
    spec = str(synthetic_shards / "train-{000000..000003}.tar")
    urls = expand_shards(spec)
    assert urls == shards(synthetic_shards, "train")
    counts = manifest_counts(urls)
    assert [c["count"] for c in counts.values()] == [6, 6, 6, 2]
    assert samples_per_epoch(urls, "random") == 20 and samples_per_epoch(urls, "pairs") == 60
    both = expand_shards(spec + "::" + str(synthetic_shards / "val-000000.tar"))
    assert len(both) == 5
    # a wildcard: the files it matches, sorted (glob's own order is the directory's); the brace range's list
    assert expand_shards(str(synthetic_shards / "train-*.tar")) == [
        str(synthetic_shards / f"train-{i:06d}.tar") for i in range(4)]
    assert expand_shards(str(synthetic_shards / "t*-00000[01].tar")) == [
        str(synthetic_shards / n) for n in ("test-000000.tar", "test-000001.tar", "train-000000.tar",
                                            "train-000001.tar")]
    with pytest.raises(ConfigError, match="no shards match .*trian-"):
        expand_shards(str(synthetic_shards / "trian-*.tar"))
    assert expand_shards("pipe:cat x-*.tar") == ["pipe:cat x-*.tar"]  # a command's wildcard is the shell's
    with pytest.raises(FileNotFoundError, match="--train_num_samples"):
        manifest_counts(["pipe:cat x.tar"])


def test_synthetic_tokenizer_beside_the_shards(synthetic_shards):
    tok = load_tokenizer(str(synthetic_shards / "tokenizer"))
    ids = tok("a red circle moves left")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_tokenizer("openai/clip-vit-base-patch32")


def test_clip_bpe_tokenizer_from_vocab_and_merges(tmp_path):
    """A checkpoint-style CLIP tokenizer (vocab.json + merges.txt, CLIP's byte-level BPE) loads offline."""
    # GPT-2 / CLIP byte -> unicode table: printable bytes map to themselves, the rest to 256 + n
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    merges = [("c", "a"), ("ca", "t</w>")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    from tmass.data.tokenizer import tokenize

    tok = load_tokenizer(str(tmp_path))
    ids, mask = tokenize(tok, ["cat"])
    v = {t: i for i, t in enumerate(vocab)}
    assert ids.shape == (1, 77) and ids[0, :3].tolist() == [v["<|startoftext|>"], v["cat</w>"], v["<|endoftext|>"]]
    assert mask[0].sum() == 3


# ----------------------------------------------------------------------------- evaluation: exactly once
def test_reader_assignment_covers_every_sample_once():
    for shards_n in range(1, 6):
        for readers in range(1, 8):
            sizes = [7 + s for s in range(shards_n)]
            seen = Counter_of(shards_n, readers, sizes)
            assert all(seen[(s, p)] == 1 for s in range(shards_n) for p in range(sizes[s]))


def Counter_of(shards_n, readers, sizes):
    from collections import Counter

    c = Counter()
    for r in range(readers):
        for s, off, stride in reader_assignment(shards_n, readers, r):
            c.update((s, p) for p in range(sizes[s]) if p % stride == off)
    return c


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_eval_stream_is_exactly_once_in_a_deterministic_order(synthetic_shards, world, workers):
    urls = shards(synthetic_shards, "test")  # 2 shards (6 + 1): fewer than readers for most settings
    tok = load_tokenizer(str(synthetic_shards / "tokenizer"))
    got = []
    for rank in range(world):
        ds = EvalStream(urls, cfg(num_workers=workers), tok, 2, num_frames=FRAMES, rank=rank, world=world)
        for b in make_loader(ds, workers):
            assert b["video"].dtype == torch.uint8 and b["video"].shape[1:] == (4, 3, 32, 32)
            assert b["input_ids"].shape[0] == len(b["text_video"]) == 3 * len(b["keys"])  # all captions kept
            got += list(zip(b["shard"].tolist(), b["pos"].tolist(), b["keys"]))
    assert len(got) == 7 and len(set(got)) == 7
    order = [k for _, _, k in sorted(got)]
    assert order == [f"synth_test_{i:06d}" for i in range(7)]


# ----------------------------------------------------------------------------- training: equal counts, resume
def train_batches(root, n, rank=0, world=1, workers=0, position=None, batch_size=3, **kw):
    tok = load_tokenizer(str(root / "tokenizer"))
    ds = TrainStream(shards(root, "train"), cfg(num_workers=workers, **kw), tok, n, batch_size=batch_size,
                     num_frames=FRAMES, seed=SEED, rank=rank, world=world, position=position)
    return list(make_loader(ds, workers))


@pytest.mark.parametrize("sampling", ["resampled", "shuffled"])
def test_every_rank_makes_the_same_number_of_batches(synthetic_shards, sampling):
    for rank in range(3):
        bs = train_batches(synthetic_shards, 5, rank=rank, world=3, workers=2, shard_sampling=sampling)
        assert len(bs) == 5
        assert all(b["video"].shape == (3, 4, 3, 32, 32) and len(b["captions"]) == 3 for b in bs)


def test_pairs_mode_sees_every_caption_of_a_shuffled_epoch(synthetic_shards):
    bs = train_batches(synthetic_shards, 20, shard_sampling="shuffled", caption_sampling="pairs", batch_size=3,
                       shuffle_buffer=0)
    pairs = [(k, c) for b in bs for k, c in zip(b["keys"], b["captions"])]
    assert len(set(pairs)) == 60  # 20 videos x 3 captions, each once in the first 60 samples
    bs = train_batches(synthetic_shards, 20, shard_sampling="shuffled", caption_sampling="pairs", batch_size=3)
    assert len({(k, c) for b in bs for k, c in zip(b["keys"], b["captions"])}) == 60  # the buffer too


def epoch_keys(root, urls, world, workers, micro, sampling="shuffled", buffer=8, epoch=0):
    """Every rank's batches of one epoch of ceil(N / B) global batches, as train() asks for them."""
    import math


    n = sum(c["count"] for c in manifest_counts(urls).values())
    steps = math.ceil(n / (micro * world))
    tok = load_tokenizer(str(root / "tokenizer"))
    out = []
    for rank in range(world):
        ds = TrainStream(urls, cfg(num_workers=workers, shard_sampling=sampling, shuffle_buffer=buffer), tok, steps,
                         batch_size=micro, num_frames=FRAMES, seed=SEED, rank=rank, world=world,
                         position=StreamPosition(epoch=epoch, streams=max(1, workers)))
        out.append([b["keys"] for b in make_loader(ds, workers)])
    return n, steps, out


@pytest.mark.parametrize("world, workers, micro, shards_used, buffer", [
    (2, 2, 2, 4, 8),     # 4 readers over 4 uneven shards (6, 6, 6, 2): B = 4, N = 20, exactly once
    (2, 2, 3, 4, 8),     # B = 6: 4 steps hold 24 slots, so 4 samples are seen twice, none missed
    (3, 2, 1, 2, 200),   # 6 readers over 2 shards (12 samples), a buffer larger than the epoch
    (1, 0, 4, 1, 200),   # one shard, one reader, the buffer larger than the shard
])
def test_a_shuffled_epoch_sees_every_sample(synthetic_shards, world, workers, micro, shards_used, buffer):
    """--shard_sampling shuffled: the distinct keys of one epoch, counted over every rank, are all of the
    shards' samples, every rank makes the same number of batches, and the order differs between epochs."""
    import webdataset as wds

    urls = shards(synthetic_shards, "train")[:shards_used]
    truth = {s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda x: x,
                                                  empty_check=False)}
    n, steps, per_rank = epoch_keys(synthetic_shards, urls, world, workers, micro, buffer=buffer)
    assert n == len(truth)
    assert [len(r) for r in per_rank] == [steps] * world
    seen = [k for r in per_rank for b in r for k in b]
    assert set(seen) == truth and len(seen) == steps * micro * world
    _, _, again = epoch_keys(synthetic_shards, urls, world, workers, micro, buffer=buffer, epoch=1)
    assert sorted(seen) == sorted(k for r in again for b in r for k in b) or n < steps * micro * world
    assert again != per_rank


@pytest.mark.parametrize("sampling", ["resampled", "shuffled"])
def test_resume_from_a_position_continues_the_stream(synthetic_shards, sampling):
    full = train_batches(synthetic_shards, 7, workers=2, video_sample_type="rand", shard_sampling=sampling)
    pos = StreamPosition(streams=2)
    for b in full[:3]:
        pos.advance(b)
    pos = StreamPosition.from_state_dict(json.loads(json.dumps(pos.state_dict())))  # as a checkpoint stores it
    rest = train_batches(synthetic_shards, 7, workers=2, position=pos, video_sample_type="rand",
                         shard_sampling=sampling)
    assert len(rest) == 4
    for a, b in zip(full[3:], rest):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["input_ids"], b["input_ids"])
    with pytest.raises(ValueError, match="--num_workers 2"):
        train_batches(synthetic_shards, 7, workers=1, position=pos)


# ----------------------------------------------------------------------------- bad and hanging samples
def write_bad_shard(path):
    good = make_clip(64, 48, fps=6, seconds=2)
    meta = lambda k: json.dumps({"captions": [f"caption of {k}"]}).encode()  # noqa: E731
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "good1", "mp4": good, "json": meta("good1")})
        w.write({"__key__": "truncated", "mp4": good[:len(good) // 3], "json": meta("t")})
        w.write({"__key__": "garbage", "mp4": random.Random(0).randbytes(5000), "json": meta("g")})
        w.write({"__key__": "zeroframes", "mp4": undecodable_clip(), "json": meta("z")})
        w.write({"__key__": "nocaption", "mp4": good, "json": json.dumps({"captions": []}).encode()})
        w.write({"__key__": "novideo", "json": meta("n")})
        w.write({"__key__": "hang", "mp4": b"HANG" + good, "json": meta("h")})
        w.write({"__key__": "good2", "mp4": good, "json": meta("good2")})


def hanging_decode(data, *a, **kw):
    if data.startswith(b"HANG"):
        time.sleep(30)
    return decode_frames(data, *a, **kw)


class ParentPid(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.tensor([os.getppid()])


def test_loader_workers_are_not_forked_from_the_trainer():
    """The trainer runs threads (TensorBoard, the run lock, the launcher watch, queue feeders); a worker forked
    from it can block for ever in os.fork's child. Workers come from a single-threaded forkserver instead."""
    (parent,) = [int(b) for b in make_loader(ParentPid(), 1)]
    assert parent != os.getpid()
    assert [int(b) for b in make_loader(ParentPid(), 1)] == [parent]  # the same server, every epoch


def test_bad_and_hanging_samples_are_skipped_and_counted(tmp_path, synthetic_shards):
    write_bad_shard(tmp_path / "bad-000000.tar")
    tok = load_tokenizer(str(synthetic_shards / "tokenizer"))
    t = time.time()
    ds = EvalStream([str(tmp_path / "bad-000000.tar")], cfg(decode_timeout=0.5), tok, 8, num_frames=FRAMES,
                    decode=hanging_decode)
    (batch,) = list(make_loader(ds, 0))
    assert time.time() - t < 15
    assert batch["keys"] == ["good1", "good2"]
    reasons = batch["stats"]["reasons"]
    assert reasons.pop("decode timeout") == 1 and reasons.pop("no caption") == 1
    assert reasons.pop("no video bytes") == 1
    assert sum(reasons.values()) == 3 and set(reasons) <= {"decode error", "no frames"}
    assert batch["stats"]["seen"] == 8 and batch["stats"]["ok"] == 2


@pytest.mark.parametrize("source", ["all-bad shard", "failing pipe", "empty shard"])
def test_a_training_stream_with_no_good_sample_stops_with_the_shards_named(tmp_path, synthetic_shards, source):
    """A shard whose every sample is bad, a `pipe:` command that fails, or a shard that holds nothing: the
    training stream (which cycles its shards for ever) raises, naming the shard, instead of spinning."""
    from tmass.data.stream import StreamStalled

    tok = load_tokenizer(str(synthetic_shards / "tokenizer"))
    url = str(tmp_path / "train-000000.tar")
    if source == "all-bad shard":
        with wds.TarWriter(url) as w:
            for i in range(5):
                w.write({"__key__": f"novideo{i}", "json": json.dumps({"captions": ["a caption"]}).encode()})
        kw, shown = dict(stall_skips=40), "no video bytes: 40.*train-000000.tar"
    elif source == "failing pipe":
        url, kw, shown = "pipe:exit 3", dict(stall_skips=10), "unreadable shard .*pipe:exit 3"
    else:
        with wds.TarWriter(url):
            pass
        kw, shown = dict(stall_skips=0, stall_seconds=2.0), "no samples at all.*train-000000.tar"
    t = time.time()
    ds = TrainStream([url], cfg(**kw), tok, 3, batch_size=3, num_frames=FRAMES, seed=SEED)
    with pytest.raises(StreamStalled, match=shown):
        list(make_loader(ds, 0))
    assert time.time() - t < 30


def test_captions_of_a_hand_made_sample():
    """A json whose "captions" is one string is one caption, not one per letter; other types give none."""
    from tmass.data.stream import captions_of

    assert captions_of({"json": json.dumps({"captions": "a man cooks"}).encode()}) == ["a man cooks"]
    assert captions_of({"json": json.dumps({"captions": ["a", " ", 3, "b c"]}).encode()}) == ["a", "b c"]
    assert captions_of({"json": json.dumps({"captions": {"x": 1}}).encode()}) == []
    assert captions_of({"txt": b"one\n\ntwo\n"}) == ["one", "two"]


def test_too_many_bad_samples_names_the_worst_shards():
    a = SkipStats(seen=300, ok=270)
    for _ in range(25):
        a.skip("decode error", "s/train-000007.tar")
    for _ in range(5):
        a.skip("no caption", "s/train-000001.tar")
    total = SkipStats.total([a.to_dict(), SkipStats(seen=100, ok=100).to_dict()])
    check_bad_fraction(total, 0.1)  # 30 / 400 is under 10 %
    with pytest.raises(TooManyBadSamples, match=r"30 of 400.*train-000007.tar \(25\)"):
        check_bad_fraction(total, 0.05)


def test_wrong_data_flags_fail_fast():
    with pytest.raises(ValueError, match="--caption_sampling"):
        DataConfig(caption_sampling="all")
    with pytest.raises(ValueError, match="--video_sample_type"):
        DataConfig(video_sample_type="middle")


def test_a_stuck_decoder_does_not_hold_the_process_at_exit():
    code = ("import time\nfrom tmass.data.video import TimedDecoder, DecodeError\n"
            "d = TimedDecoder(0.2, lambda *a: time.sleep(60))\n"
            "try:\n    d(b'x', 4, 'uniform')\nexcept DecodeError as e:\n    print(e.reason)\n")
    import subprocess
    import sys

    from conftest import REPO
    t = time.time()
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "decode timeout" and time.time() - t < 20


def test_training_and_evaluation_import_without_the_encoder():
    """GPU nodes stream shards; they need decord but not PyAV, which only the shard builder uses."""
    block_av = ("import builtins; real = builtins.__import__\n"
                "def imp(name, *a, **k):\n"
                "    if name == 'av' or name.startswith('av.'): raise ImportError('no PyAV here')\n"
                "    return real(name, *a, **k)\n"
                "builtins.__import__ = imp\n"
                "import tmass.data.stream, tmass.evaluate, tmass.train\n"
                "try:\n    import tmass.shards.transcode\nexcept ImportError:\n    print('blocked')\n")
    p = subprocess.run([sys.executable, "-c", block_av], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "blocked"  # the blocker works: the builder's encoder does need PyAV
