"""Source adapters: each reads one dataset's own annotation files and returns `VideoItem`s for a split."""

from .base import AnnotationError, Source, SourceOptions, VideoItem
from .charades import Charades
from .didemo import DiDeMo
from .generic import CSVSource, JSONLSource
from .lsmdc import LSMDC
from .msrvtt import MSRVTT
from .synthetic import Synthetic
from .vatex import VATEX

SOURCES: dict[str, Source] = {
    s.name: s for s in (MSRVTT(), LSMDC(), DiDeMo(), VATEX(), Charades(), CSVSource(), JSONLSource(), Synthetic())
}

__all__ = ["SOURCES", "AnnotationError", "Source", "SourceOptions", "VideoItem"]
