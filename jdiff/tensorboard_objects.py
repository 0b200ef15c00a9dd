"""TensorBoard event files in an object store (`gs://`, `s3://`, ...), through epath.

tensorboardX appends records to one open file, and an object cannot be appended to. Its own S3 and
GCS writers keep every record and upload the whole file again at each flush (and need boto3 or
google-cloud-storage). Here the records since the last upload go into a new object named after the
event file plus a part number: TensorBoard reads every `events.out.tfevents.*` file of a folder in
name order, so the parts read as one file, and memory holds only the records not yet uploaded.
"""

import io
import time

from tensorboardX import record_writer

from jdiff import paths

UPLOAD_SECONDS = 30.0  # a flush uploads at most this often (tensorboardX flushes on every add here)


class _PartsWriter:
    def __init__(self, path: str):
        self.path = paths.as_path(path)
        self.pending = io.BytesIO()
        self.parts = 0
        self.uploaded_at = 0.0

    def write(self, data: bytes) -> None:
        self.pending.write(data)

    def flush(self, force: bool = False) -> None:
        if not self.pending.tell() or (not force and time.monotonic() - self.uploaded_at < UPLOAD_SECONDS):
            return
        part = self.path.with_name(f"{self.path.name}.{self.parts:06d}")
        part.write_bytes(self.pending.getvalue())
        self.parts += 1
        self.pending = io.BytesIO()
        self.uploaded_at = time.monotonic()

    def close(self) -> None:
        self.flush(force=True)


class _Factory:
    def open(self, path: str) -> _PartsWriter:
        return _PartsWriter(path)

    def directory_check(self, path: str) -> None:
        paths.as_path(path).mkdir(parents=True, exist_ok=True)


def register(logdir) -> None:
    """Makes tensorboardX write `logdir`'s event files through this module when it is an object store."""
    if not paths.is_local(logdir):
        record_writer.register_writer_factory(str(logdir).split("://")[0], _Factory())
