"""Shard lists: webdataset's URL syntax expanded, and the sample counts of the builder's manifests."""
from __future__ import annotations

import glob
import json
import os

import webdataset as wds

from ..errors import ConfigError


def expand_shards(spec: str | list[str]) -> list[str]:
    """webdataset's URL syntax: brace ranges, several sources joined by '::', local paths or 'pipe:' commands;
    a local path with a wildcard ('shards/msrvtt/train-*.tar') is every file it matches, in sorted order."""
    if not isinstance(spec, str):
        return [u for s in spec for u in expand_shards(s)]
    urls = []
    for url in wds.shardlists.expand_urls(spec):
        if is_local(url) and any(c in url for c in "*?["):
            found = sorted(glob.glob(url))
            if not found:
                raise ConfigError(f"no shards match {url}: check the path (tmass-build-shards writes "
                                  f"{{split}}-000000.tar, ... and a {{split}}.json manifest listing them)")
            urls += found
        else:
            urls.append(url)
    if not urls:
        raise ConfigError(f"no shards in {spec!r}")
    return urls


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def missing_shards(urls: list[str]) -> list[str]:
    """The local shards of `urls` that do not exist (`pipe:` commands and remote URLs are not checked)."""
    return [u for u in urls if is_local(u) and not os.path.isfile(u)]


def manifest_counts(urls: list[str]) -> dict[str, dict]:
    """url -> {"count": videos, "captions": captions} from the builder's manifests beside local shards."""
    out: dict[str, dict] = {}
    manifests: dict[str, dict] = {}
    for url in urls:
        folder, name = os.path.split(url)
        split = name.rsplit("-", 1)[0]
        path = os.path.join(folder, f"{split}.json")
        if path not in manifests:
            if url.startswith("pipe:") or not os.path.exists(path):
                raise FileNotFoundError(f"no manifest for {url} (looked for {path}); pass the sample count "
                                        f"explicitly (e.g. --train_num_samples) for shards without one")
            with open(path) as f:
                manifests[path] = {s["shard"]: s for s in json.load(f)["shards"]}
        if name not in manifests[path]:
            raise FileNotFoundError(f"{url} is not listed in {path}")
        out[url] = manifests[path][name]
    return out


def samples_per_epoch(urls: list[str], caption_sampling: str) -> int:
    counts = manifest_counts(urls).values()
    return sum(c["captions"] if caption_sampling == "pairs" else c["count"] for c in counts)
