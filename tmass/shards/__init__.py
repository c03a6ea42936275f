"""The shard builder: dataset adapters (sources/), video normalisation (transcode), shard writing with
resume (writer), and the build itself (build, cli)."""
