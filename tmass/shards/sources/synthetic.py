"""The built-in synthetic corpus: short videos of moving coloured shapes, with captions that say what
the pixels show.

A video is one or two events, one after the other. An event is `count` objects of one colour and shape
moving in one direction; its objects are visible only during the event's half (or all) of the clip:

    "two red circles move left, then a blue triangle slides up"

Videos come in groups of three that share most of their content, so that retrieval needs both
appearance and motion:
    base            random events
    motion twin     the same objects, every event moving in another direction
    third           the same motion with other colours/shapes (appearance twin), or, for two events,
                    the same events in the other order (order twin)
Everything is a function of (seed, split, index): the corpus does not depend on the number of workers.

The partial-caption corpus (`--synthetic_captions partial`) asks what T-MASS claims: that a caption tells only
part of what its video shows. Each video holds three events, one per third of the clip, with three different
(colour, shape) pairs; each caption names one or two of them (one of the six proper, non-empty subsets, drawn
uniformly), in their order, and never all three:

    video:    two red circles move left | a blue triangle slides up | a green square moves right
    captions: "a blue triangle slides up", "two red circles move left, then a green square moves right", ...

The events are drawn independently for every video (no twins), so a one-event caption is also true of the
other videos that happen to hold that event; its own video stays the only correct answer, as on MSR-VTT.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..transcode import TranscodeOptions, encode_frames
from .base import SourceOptions, VideoItem

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (160, 70, 210),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 1000, "val": 100, "test": 200}

# The raw clip, before the builder normalises it like any other video.
WIDTH, HEIGHT, FPS, SECONDS, RADIUS = 320, 240, 12, 6, 22
RAW_ENCODING = TranscodeOptions(short_side=10_000, crf=18, preset="ultrafast", tune="")

_VERBS = [("moves", "move"), ("is moving", "are moving"), ("slides", "slide"), ("travels", "travel")]
_DIR_WORDS = {
    "left": ["left", "to the left"],
    "right": ["right", "to the right"],
    "up": ["up", "upward"],
    "down": ["down", "downward"],
}
_JOINS = ["{0}, then {1}", "first {0}, after that {1}", "{0} and afterwards {1}"]


def grammar_text() -> list[str]:
    """Every word and mark the captions can use (the corpus tokenizer's vocabulary)."""
    words = [*COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), "a", "two", "three", "first"]
    words += [w for pair in _VERBS for v in pair for w in v.split()]
    words += [w for ws in _DIR_WORDS.values() for d in ws for w in d.split()]
    words += [w for j in _JOINS for w in j.replace("{0}", "").replace("{1}", "").split()]
    return [" ".join(words)]


@dataclass(frozen=True)
class Event:
    colour: str
    shape: str
    direction: str
    count: int

    def phrase(self, rng: np.random.Generator) -> str:
        one, many = _VERBS[rng.integers(len(_VERBS))]
        where = _DIR_WORDS[self.direction][rng.integers(2)]
        if self.count == 1:
            return f"a {self.colour} {self.shape} {one} {where}"
        return f"{['', '', 'two', 'three'][self.count]} {self.colour} {self.shape}s {many} {where}"


# The proper, non-empty subsets of a partial video's three events, in time order.
PARTIAL_SUBSETS = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2))
CAPTION_KINDS = ("full", "partial")


@dataclass(frozen=True)
class SyntheticVideo:
    events: tuple[Event, ...]
    seed: tuple[int, ...]
    partial: bool = False  # captions name a proper subset of the events

    def captions(self, n: int) -> list[str]:
        """n different captions (repeats only if fewer exist): paraphrases of all the events, or with `partial`
        of one of PARTIAL_SUBSETS each."""
        return [text for text, _ in self.named_captions(n)]

    def named_captions(self, n: int) -> list[tuple[str, tuple[int, ...]]]:
        """The captions, each with the events it names (indices into self.events, in time order)."""
        rng = np.random.default_rng([*self.seed, 1])
        out: list[tuple[str, tuple[int, ...]]] = []
        for _ in range(20 * n):
            named = PARTIAL_SUBSETS[rng.integers(len(PARTIAL_SUBSETS))] if self.partial else range(len(self.events))
            phrases = [self.events[i].phrase(rng) for i in named]
            text = phrases[0] if len(phrases) == 1 else _JOINS[rng.integers(len(_JOINS))].format(*phrases)
            if text not in (t for t, _ in out):
                out.append((text, tuple(named)))
            if len(out) == n:
                break
        return (out * n)[:n]

    def frames(self) -> np.ndarray:
        """[T, H, W, 3] uint8 RGB."""
        rng = np.random.default_rng([*self.seed, 2])
        t_total = FPS * SECONDS
        video = np.empty((t_total, HEIGHT, WIDTH, 3), np.uint8)
        video[:] = rng.integers(20, 70, size=3, dtype=np.uint8)  # a dark background, tinted per video
        per_event = t_total // len(self.events)
        for e, ev in enumerate(self.events):
            dx, dy = DIRECTIONS[ev.direction]
            span = (WIDTH if dx else HEIGHT) // 2  # distance travelled during the event
            lanes = self._lanes(rng, ev.count, HEIGHT if dx else WIDTH)
            start = rng.integers(RADIUS + 4, (WIDTH if dx else HEIGHT) - RADIUS - 4 - span + 1)
            for k in range(per_event):
                along = start + span * k / max(1, per_event - 1)
                if dx + dy < 0:  # moving left/up: travel from the far end back
                    along = (WIDTH if dx else HEIGHT) - along
                for lane in lanes:
                    cx, cy = (along, lane) if dx else (lane, along)
                    _draw(video[e * per_event + k], ev.shape, cx, cy, COLOURS[ev.colour])
        return video

    @staticmethod
    def _lanes(rng: np.random.Generator, count: int, extent: int) -> list[int]:
        """Positions across the motion axis, at least 3 radii apart."""
        lo, hi = RADIUS + 4, extent - RADIUS - 4
        while True:
            lanes = sorted(int(x) for x in rng.integers(lo, hi, size=count))
            if all(b - a >= 3 * RADIUS for a, b in zip(lanes, lanes[1:])):
                return lanes

    def render(self) -> bytes:
        return encode_frames(self.frames(), FPS, RAW_ENCODING)


def _draw(frame: np.ndarray, shape: str, cx: float, cy: float, colour: tuple[int, int, int]) -> None:
    """Paint one shape centred at (cx, cy), working only in its bounding box."""
    x0, y0 = max(0, int(cx) - 2 * RADIUS), max(0, int(cy) - 2 * RADIUS)
    yy, xx = np.mgrid[y0 : min(frame.shape[0], int(cy) + 2 * RADIUS), x0 : min(frame.shape[1], int(cx) + 2 * RADIUS)]
    window = frame[y0 : y0 + yy.shape[0], x0 : x0 + xx.shape[1]]
    window[_mask(shape, xx, yy, cx, cy)] = colour


def _mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float) -> np.ndarray:
    r = RADIUS
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        s = 0.886 * r  # the same area as the circle
        return (abs(xx - cx) <= s) & (abs(yy - cy) <= s)
    # an upward triangle, apex at (cx, cy - r), base 2.3 r wide at cy + r
    h = (yy - (cy - r)) / (2 * r)
    return (h >= 0) & (h <= 1) & (abs(xx - cx) <= 1.15 * r * h)


def _random_event(rng: np.random.Generator) -> Event:
    return Event(
        str(rng.choice(list(COLOURS))),
        str(rng.choice(SHAPES)),
        str(rng.choice(list(DIRECTIONS))),
        int(rng.choice([1, 2], p=[0.6, 0.4])),
    )


def _other(rng: np.random.Generator, options, current: str) -> str:
    return str(rng.choice([o for o in options if o != current]))


def group(rng: np.random.Generator) -> list[tuple[Event, ...]]:
    """A base video and its two twins (see the module docstring)."""
    first = _random_event(rng)
    base = (first,)
    if rng.random() < 0.6:
        second = _random_event(rng)
        while (second.colour, second.shape) == (first.colour, first.shape):
            second = _random_event(rng)
        base = (first, second)
    motion = tuple(Event(e.colour, e.shape, _other(rng, DIRECTIONS, e.direction), e.count) for e in base)
    if len(base) == 2 and rng.random() < 0.5:
        third = base[::-1]
    else:
        third = tuple(
            Event(
                _other(rng, COLOURS, e.colour),
                _other(rng, SHAPES, e.shape) if rng.random() < 0.5 else e.shape,
                e.direction,
                e.count,
            )
            for e in base
        )
    return [base, motion, third]


def partial_events(rng: np.random.Generator) -> tuple[Event, ...]:
    """Three events with three different (colour, shape) pairs."""
    events: list[Event] = []
    while len(events) < 3:
        e = _random_event(rng)
        if all((e.colour, e.shape) != (x.colour, x.shape) for x in events):
            events.append(e)
    return tuple(events)


def make_videos(split: str, n: int, seed: int, captions: str = "full") -> list[SyntheticVideo]:
    split_id = SPLIT_IDS.get(split, 3 + sum(map(ord, split)))
    if captions == "partial":  # streams of their own: (seed, split, index, 3), where the full corpus's 4th is < 3
        keys = [(seed, split_id, i, 3) for i in range(n)]
        return [SyntheticVideo(partial_events(np.random.default_rng(k)), k, True) for k in keys]
    out: list[SyntheticVideo] = []
    g = 0
    while len(out) < n:
        for k, events in enumerate(group(np.random.default_rng([seed, split_id, g]))):
            out.append(SyntheticVideo(events, (seed, split_id, g, k)))
        g += 1
    return out[:n]


class Synthetic:
    name = "synthetic"
    splits = ("train", "val", "test")
    files: dict[str, str] = {}

    def items(self, split: str, opts: SourceOptions) -> list[VideoItem]:
        n = opts.num_videos.get(split, DEFAULT_SIZES.get(split, 100))
        return [
            VideoItem(
                f"synth_{split}_{i:06d}",
                v.captions(opts.captions_per_video),
                synth=v,
                meta={"events": [asdict(e) for e in v.events]},
            )
            for i, v in enumerate(make_videos(split, n, opts.seed, opts.synthetic_captions))
        ]
