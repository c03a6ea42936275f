"""The synthetic corpus: captions must follow from the pixels, and the corpus must need both appearance
and motion. Captions are parsed here with a grammar of our own, and checked against a pixel analysis
written for the test (colour masks, connected components, centroid tracks)."""
import re
from collections import deque

import numpy as np
import pytest

from _media import decode_all
from tmass.shards.sources import SOURCES, SourceOptions
from tmass.shards.sources.synthetic import COLOURS, make_videos
from tmass.shards.transcode import TranscodeOptions, transcode

WORDS = {"a": 1, "two": 2, "three": 3}
DIRS = {"left": "left", "to the left": "left", "right": "right", "to the right": "right",
        "up": "up", "upward": "up", "down": "down", "downward": "down"}
EVENT = re.compile(r"^(a|two|three) (\w+) (circle|square|triangle)s? (?:moves|move|is moving|are moving|slides|"
                   r"slide|travels|travel) (to the left|to the right|left|right|upward|up|downward|down)$")


def parse(caption):
    text = re.sub(r"^first ", "", caption)
    parts = re.split(r", then |, after that | and afterwards ", text)
    out = []
    for p in parts:
        m = EVENT.match(p)
        assert m, f"unparsable: {p!r} in {caption!r}"
        out.append((m.group(2), m.group(3), DIRS[m.group(4)], WORDS[m.group(1)]))
    return out


def components(mask):
    """4-connected components of a boolean mask: a list of (ys, xs) arrays."""
    seen = np.zeros_like(mask, bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        q, ys, xs = deque([(y0, x0)]), [], []
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            ys.append(y)
            xs.append(x)
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                v, u = y + dy, x + dx
                if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    q.append((v, u))
        comps.append((np.array(ys), np.array(xs)))
    return comps


def colour_mask(frame, colour, tol=60):
    return np.abs(frame.astype(int) - np.array(COLOURS[colour])).max(axis=2) < tol


def shape_of(ys, xs):
    fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return "square" if fill > 0.88 else "circle" if fill > 0.65 else "triangle"


def check_video(frames, caption):
    """Every claim of the caption holds in the pixels."""
    events = parse(caption)
    per = len(frames) // len(events)
    for e, (colour, shape, direction, count) in enumerate(events):
        window = frames[e * per:(e + 1) * per]
        mid = window[len(window) // 2]
        comps = [c for c in components(colour_mask(mid, colour)) if len(c[0]) > 100]
        assert len(comps) == count, (caption, e, [len(c[0]) for c in comps])
        assert all(shape_of(*c) == shape for c in comps), (caption, e)
        first, last = (np.nonzero(colour_mask(window[i], colour)) for i in (1, -2))
        dy, dx = last[0].mean() - first[0].mean(), last[1].mean() - first[1].mean()
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert moved == direction and max(abs(dx), abs(dy)) > 30, (caption, e, dx, dy)
        for other in range(len(events)):  # the event's objects are seen only in its own window
            if other != e and events[other][:2] != (colour, shape):
                assert colour_mask(frames[other * per + per // 2], colour).sum() < 30 or \
                    events[other][0] == colour


def test_captions_follow_from_the_raw_pixels():
    for video in make_videos("test", 24, seed=3):
        frames = video.frames()
        for caption in video.captions(5):
            check_video(frames, caption)


def test_captions_follow_from_the_normalised_clip():
    """The same claims hold after the builder's H.264 at 3 fps, 224 short side."""
    for video in make_videos("train", 6, seed=0):
        out, _ = transcode(video.render(), TranscodeOptions(short_side=224, fps=3))
        frames = np.stack(decode_all(out))
        assert frames.shape[1:] == (224, 298, 3)
        check_video(frames, video.captions(1)[0])


def test_deterministic_by_seed_and_index():
    a = SOURCES["synthetic"].items("train", SourceOptions(num_videos={"train": 9}, seed=7))
    b = SOURCES["synthetic"].items("train", SourceOptions(num_videos={"train": 12}, seed=7))
    c = SOURCES["synthetic"].items("train", SourceOptions(num_videos={"train": 9}, seed=8))
    assert [x.captions for x in a] == [x.captions for x in b[:9]]
    assert np.array_equal(a[4].synth.frames(), b[4].synth.frames())
    assert a[4].synth.render() == b[4].synth.render()
    assert [x.captions for x in a] != [x.captions for x in c]
    test = SOURCES["synthetic"].items("test", SourceOptions(num_videos={"test": 9}, seed=7))
    assert [x.captions for x in a] != [x.captions for x in test]  # the splits are different draws


def test_telling_videos_apart_needs_appearance_and_motion():
    """Within each group of three, one video shares the objects but not the motion, and another the
    motion (or the events) but not the appearance or order: neither cue alone separates the group."""
    videos = make_videos("train", 300, seed=0)
    for g in range(0, 300, 3):
        base, motion, third = (parse(v.captions(1)[0]) for v in videos[g:g + 3])
        assert [e[:2] + e[3:] for e in base] == [e[:2] + e[3:] for e in motion]  # same objects and counts
        assert all(a[2] != b[2] for a, b in zip(base, motion))  # every event moves another way
        if third == base[::-1] and len(base) == 2:
            continue  # order twin
        assert [e[2:] for e in base] == [e[2:] for e in third]  # same motion and counts
        assert all(a[:2] != b[:2] for a, b in zip(base, third))  # other colour or shape
    captions = [v.captions(1)[0] for v in videos]
    assert len(set(captions)) > 250  # varied


@pytest.mark.parametrize("n", [1, 5])
def test_captions_per_video(n):
    its = SOURCES["synthetic"].items("val", SourceOptions(num_videos={"val": 4}, captions_per_video=n))
    assert all(len(it.captions) == n for it in its)
    if n == 5:
        assert all(len(set(it.captions)) == 5 for it in its)


def test_the_corpus_tokenizer_knows_every_caption_word():
    from tmass.data.tokenizer import build_caption_tokenizer
    from tmass.shards.sources.synthetic import grammar_text

    tok = build_caption_tokenizer(grammar_text())
    for v in make_videos("test", 60, seed=5):
        for c in v.captions(5):
            assert tok.unk_token_id not in tok(c)["input_ids"], c


def pixel_events(frames):
    """The three events of a partial-caption video, read off the pixels alone: in each third of the clip, the one
    colour with objects, their count and shape, and where they move."""
    per = len(frames) // 3
    out = []
    for e in range(3):
        window = frames[e * per:(e + 1) * per]
        mid = window[len(window) // 2]
        found = [(c, comps) for c in COLOURS
                 if (comps := [x for x in components(colour_mask(mid, c)) if len(x[0]) > 100])]
        assert len(found) == 1, (e, [c for c, _ in found])
        colour, comps = found[0]
        shapes = {shape_of(*c) for c in comps}
        assert len(shapes) == 1, (e, shapes)
        first, last = (np.nonzero(colour_mask(window[i], colour)) for i in (1, -2))
        dy, dx = last[0].mean() - first[0].mean(), last[1].mean() - first[1].mean()
        assert max(abs(dx), abs(dy)) > 30, (e, dx, dy)
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        out.append((colour, shapes.pop(), moved, len(comps)))
    return out


def is_subsequence(part, whole):
    it = iter(whole)
    return all(any(p == w for w in it) for p in part)


def check_partial(frames, captions):
    events = pixel_events(frames)
    assert len({e[:2] for e in events}) == 3  # three different objects
    for caption in captions:
        named = parse(caption)
        assert 1 <= len(named) < 3, caption  # part of the video, never all of it
        assert is_subsequence(named, events), (caption, events)  # true of the pixels, in their order
    return events


def test_partial_captions_name_part_of_the_raw_pixels():
    subsets = set()
    for video in make_videos("test", 24, seed=3, captions="partial"):
        frames = video.frames()
        events = check_partial(frames, video.captions(5))
        for caption in video.captions(5):
            named = parse(caption)
            subsets.add(tuple(i for i, e in enumerate(events) if e in named))
    assert subsets == {(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)}  # every kind of part is named somewhere


def test_partial_captions_hold_after_normalisation_and_through_the_builder_source():
    its = SOURCES["synthetic"].items("train", SourceOptions(num_videos={"train": 4}, synthetic_captions="partial"))
    assert all(len(it.meta["events"]) == 3 and len(it.captions) == 5 for it in its)
    for it in its:
        out, _ = transcode(it.read(), TranscodeOptions(short_side=224, fps=3))
        check_partial(np.stack(decode_all(out)), it.captions)
    full = SOURCES["synthetic"].items("train", SourceOptions(num_videos={"train": 4}))
    assert [x.captions for x in full] != [x.captions for x in its]  # the full corpus is unchanged beside it
    assert full[0].captions == SOURCES["synthetic"].items("train", SourceOptions(num_videos={"train": 1}))[0].captions


def test_the_builder_writes_the_partial_corpus(tmp_path):
    """`tmass-build-shards --source synthetic --synthetic_captions partial`: the shards hold three events per
    video and captions that each name one or two of them."""
    import json
    import tarfile

    from tmass.shards.cli import main

    assert main(["--source", "synthetic", "--synthetic_captions", "partial", "--out", str(tmp_path), "--num_train", "3",
                 "--num_val", "0", "--num_test", "0", "--splits", "train", "--workers", "1", "--no_progress"]) == 0
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(metas) == 3
    for meta in metas:
        assert len(meta["events"]) == 3
        assert all(1 <= len(parse(c)) < 3 for c in meta["captions"])
