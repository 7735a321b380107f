"""Blob store on the local file system: one Part-10 file per stored instance.

Owns: where instance bytes live (``<root>/<key>.dcm`` with key ``YYYYMMDD/HH/<random UUID hex>``
in UTC, the hex starting with the writing process's token: a new directory only once an hour, so
directory creation and its fsyncs stay off the hot path, and after a crash only the files of the
dead process, in the hours since it started, need checking),
writing them durably (data fsynced, then the directory entry fsynced) before anyone acknowledges
them, streaming writes for large instances, reading, deleting, and listing keys so that files
without an index row can be removed after a crash.
Must not: know about the index or parse DICOM.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

SUFFIX = ".dcm"


class BlobWriter:
    """A blob being written; :meth:`commit` makes it durable, :meth:`abort` removes it."""

    def __init__(self, store: FileBlobStore, key: str) -> None:
        self.store = store
        self.key = key
        self.path = store.path(key)
        store.ensure_dir(self.path.parent)
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644
        )
        self.size = 0
        store._opened(key)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self.size += n

    def write_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        assert self._fd is not None
        total = sum(len(p) for p in parts)
        written = os.writev(self._fd, parts)
        self.size += written
        if written != total:  # short write: finish the rest piecewise
            self.write(memoryview(b"".join(bytes(p) for p in parts))[written:])

    def commit(self) -> int:
        """fsync data and directory entry (when the store syncs), close; returns the size."""
        assert self._fd is not None
        fd, self._fd = self._fd, None
        try:
            if self.store.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
            self.store._closed(self.key)
        if self.store.fsync:
            self.store.sync_dir(self.path.parent)
        return self.size

    def abort(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            self.store._closed(self.key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class FileBlobStore:
    def __init__(self, root: Path, *, fsync: bool = True, token: str | None = None) -> None:
        self.root = root
        self.fsync = fsync
        # Prefix of every key this process creates (8 hex digits), see Archive.recover.
        self.token = token or uuid.uuid4().hex[:8]
        self._open: dict[str, float] = {}  # key -> creation time, for blobs being written
        self._open_lock = threading.Lock()
        self._dirs: set[Path] = set()
        root.mkdir(parents=True, exist_ok=True)

    def _opened(self, key: str) -> None:
        with self._open_lock:
            self._open[key] = time.time()

    def _closed(self, key: str) -> None:
        with self._open_lock:
            self._open.pop(key, None)

    def oldest_open(self) -> float | None:
        """Creation time of the oldest blob still being written, if any."""
        with self._open_lock:
            return min(self._open.values(), default=None)

    def new_key(self) -> str:
        return time.strftime("%Y%m%d/%H/", time.gmtime()) + self.token + os.urandom(12).hex()

    def path(self, key: str) -> Path:
        return self.root / (key + SUFFIX)

    def ensure_dir(self, directory: Path) -> None:
        if directory in self._dirs:
            return
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            if self.fsync:  # the new directories' entries must be durable too
                self.sync_dir(directory.parent)
                self.sync_dir(directory.parent.parent)
        self._dirs.add(directory)

    @staticmethod
    def sync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def create(self, key: str | None = None) -> BlobWriter:
        return BlobWriter(self, key or self.new_key())

    def write(
        self, parts: Sequence[bytes | bytearray | memoryview], key: str | None = None
    ) -> BlobWriter:
        """Write a whole blob from memory (one writev); the caller makes it durable with
        :meth:`BlobWriter.commit`."""
        writer = self.create(key)
        try:
            writer.write_parts(parts)
            return writer
        except BaseException:
            writer.abort()
            raise

    def open(self, key: str) -> object:
        return open(self.path(key), "rb")

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    @staticmethod
    def hour_prefixes(since: float, until: float) -> list[str]:
        """The key prefixes ("YYYYMMDD/HH/") of every hour from *since* to *until*."""
        out = []
        t = int(since // 3600) * 3600
        while t <= until:
            out.append(time.strftime("%Y%m%d/%H/", time.gmtime(t)))
            t += 3600
        return out

    def keys(self, since: float | None = None, token: str = "") -> Iterator[str]:
        """Blob keys present on disk (including partial writes left by a crash); with *since*
        (a Unix time), only in hour directories from that hour on; with *token*, only the keys
        created by the process that had it."""
        floor = time.strftime("%Y%m%d%H", time.gmtime(since)) if since is not None else ""
        for day in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not day.is_dir() or len(day.name) != 8 or day.name < floor[:8]:
                continue
            for hour in os.scandir(day.path):
                if not hour.is_dir() or day.name + hour.name < floor:
                    continue
                for entry in os.scandir(hour.path):
                    if entry.name.endswith(SUFFIX) and entry.name.startswith(token):
                        yield f"{day.name}/{hour.name}/{entry.name[: -len(SUFFIX)]}"
