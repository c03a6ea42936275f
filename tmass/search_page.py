"""tmass-search's outputs: the text table, and with --html one self-contained page of hits, a thumbnail per video
(its middle frame, read from its shard and inlined as a JPEG data URI, so the page opens anywhere)."""

from __future__ import annotations

import base64
import html
import io
import tarfile

from .data.shardlist import is_local
from .data.video import DecodeError, TimedDecoder
from .files import write_text_atomic
from .shards.format import VIDEO_EXTS

THUMB = 160  # pixels, the longer side


def format_hits(query: str, hits: list[dict]) -> str:
    lines = [f"query: {query}", f"{'rank':>4} {'score':>8} {'stage1':>8}  video  (its caption)"]
    for h in hits:
        cap = f"  ({h['caption']})" if h.get("caption") else ""
        lines.append(f"{h['rank']:>4} {h['score']:>8.4f} {h['stage1']:>8.4f}  {h['key']}{cap}")
    return "\n".join(lines)


def video_bytes_in(url: str, key: str) -> bytes | None:
    """The video of sample `key` in a local tar shard, read (never extracted): None when it is not there."""
    with tarfile.open(url) as tar:
        for member in tar:
            stem, _, ext = member.name.partition(".")
            if stem == key and ext in VIDEO_EXTS and member.isfile():
                f = tar.extractfile(member)
                return f.read() if f is not None else None
    return None


def thumbnail(url: str, key: str, decode_timeout: float = 10.0) -> str | None:
    """A data: URI of the video's middle frame, or None where the shard is not a local file, the sample is gone
    or its video does not decode (within decode_timeout seconds)."""
    from PIL import Image

    if not is_local(url):
        return None
    try:
        data = video_bytes_in(url, key)
        if data is None:
            return None
        frame = TimedDecoder(decode_timeout)(data, 1, "uniform")[0]
    except (OSError, tarfile.TarError, DecodeError):
        return None
    img = Image.fromarray(frame)
    scale = THUMB / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_html(path: str, results: list[dict], index_folder: str, decode_timeout: float = 10.0) -> None:
    """One page: for each query, its hits in order, each with a thumbnail, score, key and caption; every text
    from the index or the query is escaped."""
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tmass-search</title><style>"
        "body{font-family:sans-serif;margin:2em}.hits{display:flex;flex-wrap:wrap;gap:1em}"
        ".hit{width:180px}.hit img{width:160px;image-rendering:pixelated}.none{width:160px;height:90px;"
        "background:#ddd}small{color:#555}</style></head><body>",
        f"<h1>tmass-search</h1><p>index: {e(index_folder)}</p>",
    ]
    for r in results:
        out.append(f"<h2 class='query'>{e(r['query'])}</h2><div class='hits'>")
        for h in r["hits"]:
            uri = thumbnail(h["shard"], h["key"], decode_timeout)
            pic = f"<img alt='{e(h['key'])}' src='{uri}'>" if uri else "<div class='none'>no thumbnail</div>"
            cap = f"<br><small>{e(h['caption'])}</small>" if h.get("caption") else ""
            out.append(
                f"<div class='hit' data-rank='{h['rank']}'>{pic}<br>{h['rank']}. {e(h['key'])} "
                f"<b>{h['score']:.4f}</b>{cap}</div>"
            )
        out.append("</div>")
    out.append("</body></html>")
    write_text_atomic(path, "\n".join(out))
