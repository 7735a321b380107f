"""Blob store on the local file system: one Part-10 file per stored instance.

Owns: where instance bytes live (``<root>/<key>.dcm`` with key ``YYYYMMDD/HH/<random UUID hex>``
in UTC, the hex starting with the writing process's token: a new directory only once an hour, so
directory creation and its fsyncs stay off the hot path, and after a crash only the files of the
dead process, in the hours since it started, need checking),
writing them durably (data fsynced, then the directory entry fsynced) before anyone acknowledges
them, streaming writes for large instances, reading, deleting, and listing keys so that files
without an index row can be removed after a crash.
Pre-created files: when the store syncs, a background thread keeps a small pool of empty files
whose directory entries are already durable (created in a batch, one directory fsync per batch).
A new blob takes one, so acknowledging it costs one fsync of its own data and size instead of
creating it, fsyncing it (which journals the creation) and fsyncing the directory: 173 against
329 µs per 8 KiB instance measured on this VM's ext4. Pool files stay open for writing from
their creation (no second path lookup and open per instance); one that vanished from its
directory meanwhile (link count 0) is skipped, never written and acknowledged. Pool files
older than ``POOL_MAX_AGE`` are deleted, never used (crash recovery looks at the hour
directories of the last hour), and unused ones are deleted on close; an empty file left by a
crash is removed by recovery like any incomplete blob.
Direct I/O: a blob of at least ``direct_io_min_size`` bytes written whole from memory goes to
the disk with O_DIRECT (its 4 KiB-aligned bulk copied once into a reused, page-aligned buffer;
the tail of under 4 KiB written normally), so the fsync does not push it through the page cache.
On this VM a buffered 512 KiB write + fsync cost 1.15-1.8 ms (0.8-1.45 ms of kernel CPU, most of
it page-cache writeback) against 0.47-0.77 ms (0.14-0.25 ms) with O_DIRECT; below ~200 KiB the
buffered path is faster (microbenchmark in docs/performance.md). A file system that refuses
O_DIRECT (EINVAL) turns it off for the store, and the blob is written normally.
Written pages dropped (``drop_written_pages``): once a blob is fsynced its pages are clean, and
``posix_fadvise(DONTNEED)`` returns them to the kernel. Ingest then does not fill the page cache
with instances nobody reads yet (pushing out the index and studies being viewed; large blobs
bypass it with O_DIRECT anyway), and the next blob is written into pages just freed on the same
CPU instead of fresh ones: on this VM a first write into never-used memory is slow, and
``perf`` at 64 x 64 with 4 associations showed the blob ``writev`` at 10.2 % of the server's CPU
(page-cache copy and zeroing), 3.9 % with the pages dropped, the ``fadvise`` itself 1.4 %
(microbenchmark, 9 KB file write + fsync: 125-161 against 100-156 us of system CPU per file,
lower in 14 of 14 pairs; in the server the change in throughput was inside the noise).
Must not: know about the index or parse DICOM.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import mmap
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

SUFFIX = ".dcm"
POOL_SIZE = 32  # pre-created empty files kept ready (see the module docstring)
POOL_MAX_AGE = 600.0  # seconds; older ones are deleted unused
DIRECT_IO_MIN_SIZE = 256 << 10  # default: blobs this large are written with O_DIRECT
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses: multiples of this
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class _AlignedBuffers:
    """Page-aligned anonymous mappings reused for O_DIRECT writes (a few kept per process)."""

    KEEP = 4

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is not None and len(buf) >= size:
            return buf
        if buf is not None:
            buf.close()
        return mmap.mmap(-1, -(-size // (1 << 20)) * (1 << 20))  # whole MiB

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self.KEEP:
                self._free.append(buf)
                return
        buf.close()


class BlobWriter:
    """A blob being written; :meth:`commit` makes it durable, :meth:`abort` removes it."""

    def __init__(self, store: FileBlobStore, key: str, pooled_fd: int | None = None) -> None:
        self.store = store
        self.key = key
        self.path = store.path_str(key)  # a str: pathlib costs ~20 µs per instance here
        # A pool file: empty, its directory entry durable, opened for writing when created.
        self.precreated = pooled_fd is not None
        cloexec = getattr(os, "O_CLOEXEC", 0)
        if pooled_fd is not None:
            self._fd: int | None = pooled_fd
        else:
            store.ensure_dir(os.path.dirname(self.path))
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | cloexec, 0o644)
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
        direct_min = self.store.direct_io_min_size
        if direct_min and total >= direct_min and self.size == 0 and self._write_direct(parts):
            return
        written = os.writev(self._fd, parts)
        self.size += written
        if written != total:  # short write: finish the rest piecewise
            self.write(memoryview(b"".join(bytes(p) for p in parts))[written:])

    def _write_direct(self, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
        """The whole blob with O_DIRECT (see the module docstring); False: not done, nothing
        written, the file system refused O_DIRECT (then it stays off for this store)."""
        assert self._fd is not None
        fd = self._fd
        total = sum(len(p) for p in parts)
        aligned = total - total % DIRECT_ALIGN
        buf = self.store._buffers.take(total)
        view = memoryview(buf)
        try:
            offset = 0
            for part in parts:
                view[offset : offset + len(part)] = part
                offset += len(part)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            written = 0
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT)
                while written < aligned:
                    written += os.write(fd, view[written:aligned])
            except OSError as exc:
                if exc.errno != errno.EINVAL or self.size or written:
                    raise
                self.store.direct_io_min_size = 0  # not on this file system
                return False
            finally:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            while written < total:
                written += os.pwrite(fd, view[written:total], written)
            self.size = total
            self.store.direct_writes += 1
            return True
        finally:
            view.release()
            self.store._buffers.give(buf)

    def commit(self, *, filed: bool = True) -> int:
        """fsync data and directory entry (when the store syncs), close; returns the size.
        filed=False: the blob still counts as open (:meth:`FileBlobStore.oldest_open`) until
        :meth:`filed` — its index row is not committed yet."""
        assert self._fd is not None
        fd, self._fd = self._fd, None
        try:
            if self.store.fsync:
                os.fsync(fd)
                if self.store.drop_written_pages:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
            if filed:
                self.store._closed(self.key)
        if self.store.fsync and not self.precreated:
            self.store.sync_dir(os.path.dirname(self.path))
        return self.size

    def filed(self) -> None:
        """The blob's index row is committed (see :meth:`commit`)."""
        self.store._closed(self.key)

    def abort(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self.store._closed(self.key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class FileBlobStore:
    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        token: str | None = None,
        direct_io_min_size: int = DIRECT_IO_MIN_SIZE,
        drop_written_pages: bool = False,
    ) -> None:
        self.root = root
        self.fsync = fsync
        # After a blob's fsync its (clean) pages leave the page cache (see the module docstring).
        self.drop_written_pages = drop_written_pages and hasattr(os, "posix_fadvise")
        # 0: never O_DIRECT (also where the platform has no O_DIRECT)
        self.direct_io_min_size = direct_io_min_size if _O_DIRECT else 0
        self.direct_writes = 0
        self._buffers = _AlignedBuffers()
        # Prefix of every key this process creates (8 hex digits), see Archive.recover.
        self.token = token or uuid.uuid4().hex[:8]
        self._open: dict[str, float] = {}  # key -> creation time, for blobs being written
        self._open_lock = threading.Lock()
        self._root = str(root)
        self._dirs: set[str] = set()
        root.mkdir(parents=True, exist_ok=True)
        # (key, creation time, descriptor open for writing)
        self._pool: collections.deque[tuple[str, float, int]] = collections.deque()
        self._pool_cond = threading.Condition()
        self._pool_thread: threading.Thread | None = None
        self._closing = False

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

    def new_keys(self, n: int) -> list[str]:
        """*n* new keys at once (one clock read and one random read for the batch)."""
        head = time.strftime("%Y%m%d/%H/", time.gmtime()) + self.token
        noise = os.urandom(12 * n).hex()
        return [head + noise[24 * i : 24 * (i + 1)] for i in range(n)]

    def path(self, key: str) -> Path:
        return self.root / (key + SUFFIX)

    def path_str(self, key: str) -> str:
        return f"{self._root}/{key}{SUFFIX}"

    def ensure_dir(self, directory: str | Path) -> None:
        directory = str(directory)
        if directory in self._dirs:
            return
        if not os.path.isdir(directory):
            os.makedirs(directory, exist_ok=True)
            if self.fsync:  # the new directories' entries must be durable too
                parent = os.path.dirname(directory)
                self.sync_dir(parent)
                self.sync_dir(os.path.dirname(parent))
        self._dirs.add(directory)

    @staticmethod
    def sync_dir(directory: str | Path) -> None:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def create(self, key: str | None = None) -> BlobWriter:
        while key is None and self.fsync:
            pooled = self._take_precreated()
            if pooled is None:
                break
            if os.fstat(pooled[1]).st_nlink:
                return BlobWriter(self, pooled[0], pooled[1])
            os.close(pooled[1])  # removed behind our back: the next one, or a new file
        return BlobWriter(self, key or self.new_key())

    # ------------------------------------------------------------------ pre-created files
    def _take_precreated(self) -> tuple[str, int] | None:
        stale: list[tuple[str, int]] = []
        taken = None
        with self._pool_cond:
            if self._closing:
                return None
            if self._pool_thread is None:
                self._pool_thread = threading.Thread(
                    target=self._refill, name="blob-pool", daemon=True
                )
                self._pool_thread.start()
            now = time.time()
            while self._pool:
                key, created, fd = self._pool.popleft()
                if now - created < POOL_MAX_AGE:
                    taken = (key, fd)
                    break
                stale.append((key, fd))
            if len(self._pool) < POOL_SIZE // 2:
                self._pool_cond.notify()
        self._discard_pooled(stale)
        return taken

    def _discard_pooled(self, pooled: Sequence[tuple[str, int]]) -> None:
        for key, fd in pooled:
            with contextlib.suppress(OSError):
                os.close(fd)
            self.delete(key)

    def _refill(self) -> None:
        """Keep the pool filled: create a batch of empty files, fsync their directories once.
        Each stays open for writing (a blob then costs no open of its own)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        while True:
            with self._pool_cond:
                while not self._closing and len(self._pool) >= POOL_SIZE // 2:
                    self._pool_cond.wait(POOL_MAX_AGE / 4)
                    if self._pool and time.time() - self._pool[0][1] >= POOL_MAX_AGE:
                        break  # refresh a pool nobody used for a while
                if self._closing:
                    return
                missing = POOL_SIZE - len(self._pool)
            made: list[tuple[str, int]] = []
            try:
                dirs: set[str] = set()
                for key in self.new_keys(missing):
                    path = self.path_str(key)
                    directory = os.path.dirname(path)
                    self.ensure_dir(directory)
                    made.append((key, os.open(path, flags, 0o644)))
                    dirs.add(directory)
                for directory in dirs:
                    self.sync_dir(directory)
            except OSError:  # a full or failing disk: blobs are then created one by one
                self._discard_pooled(made)
                time.sleep(1.0)
                continue
            now = time.time()
            doomed: list[tuple[str, int]]
            with self._pool_cond:
                if self._closing:
                    doomed = made
                else:
                    self._pool.extend((key, now, fd) for key, fd in made)
                    doomed = []
            self._discard_pooled(doomed)

    def close(self) -> None:
        """Stop the pool and delete its unused files."""
        with self._pool_cond:
            self._closing = True
            self._pool_cond.notify_all()
            thread = self._pool_thread
        if thread is not None:
            thread.join(timeout=10)
        with self._pool_cond:
            left = [(key, fd) for key, _, fd in self._pool]
            self._pool.clear()
        self._discard_pooled(left)

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
            os.unlink(self.path_str(key))

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
