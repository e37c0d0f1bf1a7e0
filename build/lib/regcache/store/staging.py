"""Staging a blob: appended to a temp file in the store's `staging/` and hashed as it arrives,
checked for size and digest before any store takes it (`commit_blob`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from regcache.oci.digest import DigestMismatch


class BlobStaging:
    """A blob being fetched: appended to a temp file and hashed as it arrives.

    Once the file refuses a write (disk full, I/O error), the rest is only hashed: such a staging
    can still be checked (for clients it is relayed to), never committed."""

    def __init__(self, directory: Path, digest: str) -> None:
        self.digest = digest
        self._hash = hashlib.new(digest.split(":", 1)[0])
        fd, name = tempfile.mkstemp(dir=directory, prefix="fill-")
        self.path = Path(name)
        # Unbuffered: a chunk is in the file (for readers with their own descriptors) once `write`
        # returns, and a refused write leaves nothing buffered for `close` to fail on again.
        self._file = os.fdopen(fd, "wb", buffering=0)
        self.size = 0  # bytes taken and hashed
        self.on_disk = 0  # how many of them are in the file
        self.spilled = False  # the file refused a write: it holds only the first `on_disk` bytes

    def write(self, chunk: bytes) -> None:
        """Hash `chunk` and append it to the file. The first write the file refuses raises its
        OSError, with the chunk hashed all the same; later chunks are only hashed."""
        self._hash.update(chunk)
        self.size += len(chunk)
        if self.spilled:
            return
        try:
            view = memoryview(chunk)
            while view:
                view = view[self._file.write(view) :]
        except OSError:
            self.spilled = True
            raise
        self.on_disk = self.size

    def flush(self) -> None:
        self._file.flush()

    def check(self, expected_size: int | None) -> None:
        """Are the bytes written so far the whole blob (size and digest)? No I/O."""
        if expected_size is not None and self.size != expected_size:
            raise DigestMismatch(f"{self.digest}: got {self.size} bytes, expected {expected_size}")
        actual = f"{self._hash.name}:{self._hash.hexdigest()}"
        if actual != self.digest:
            raise DigestMismatch(f"{self.digest}: bytes hash to {actual}")

    def verify(self, expected_size: int | None) -> None:
        """`check`, then the file on disk before the index says it is there."""
        self.check(expected_size)
        if self.spilled:
            raise OSError(f"{self.digest}: the staging file lacks the bytes the disk refused")
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
