"""What a shard sample holds, shared by the builder that writes it and the stream that reads it. Importing this
needs no encoder (PyAV), so that training and evaluation machines do without one."""

# The webdataset key (= file extension) a sample's video is stored under: the source's own container when it is
# kept as it is, else mp4.
VIDEO_EXTS = ("mp4", "avi", "mkv", "webm", "mov", "mpg", "mpeg", "m4v", "wmv", "3gp", "flv", "mts", "ts")
