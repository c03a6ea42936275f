"""The data pipeline: shards -> decoded, augmented, tokenized batches (stream.py), with decoding (video.py),
transforms (transforms.py) and tokenization (tokenizer.py)."""
