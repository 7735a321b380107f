"""The file blob store: durable writes, and the pool of pre-created files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from openpacs.blobs import files
from openpacs.blobs.files import FileBlobStore


def _wait_pool(store: FileBlobStore, at_least: int) -> None:
    deadline = time.monotonic() + 10
    while len(store._pool) < at_least:
        assert time.monotonic() < deadline, "the pool was not filled"
        time.sleep(0.01)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*" + files.SUFFIX))


def test_blobs_come_from_the_pool_and_are_written_in_place(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path, token="abcd0123")
    first = store.create()  # starts the pool; this one may be created directly
    first.write(b"x" * 10)
    first.commit()
    _wait_pool(store, files.POOL_SIZE // 2)
    pooled = [key for key, _, _ in store._pool]
    writer = store.create()
    assert writer.precreated and writer.key == pooled[0]
    assert os.path.getsize(writer.path) == 0  # the pool file is empty until written
    writer.write_parts([b"DICM", b"-data"])
    assert writer.commit() == 9
    assert store.read(writer.key) == b"DICM-data"
    assert writer.key.split("/")[-1].startswith("abcd0123")  # recovery finds it by the token

    store.close()  # unused pool files are deleted
    assert {p.name for p in _files(tmp_path)} == {
        first.key.split("/")[-1] + files.SUFFIX,
        writer.key.split("/")[-1] + files.SUFFIX,
    }
    after = store.create()  # a closed pool: blobs are created directly
    assert not after.precreated
    after.abort()


def test_stale_and_vanished_pool_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    store = FileBlobStore(tmp_path)
    store.create().abort()
    _wait_pool(store, files.POOL_SIZE // 2)
    with store._pool_cond:
        stale_key, _, stale_fd = store._pool[0]
        store._pool[0] = (stale_key, time.time() - files.POOL_MAX_AGE - 1, stale_fd)
        vanished_key = store._pool[1][0]
    os.unlink(store.path(vanished_key))
    writer = store.create()  # the stale file is deleted unused; the vanished one is skipped
    assert writer.precreated and writer.key not in (stale_key, vanished_key)
    assert not store.path(stale_key).exists()
    writer.abort()
    writer = store.create()
    assert writer.key != vanished_key
    writer.abort()
    store.close()
    assert _files(tmp_path) == []
    # pool files are kept open for writing: closing the store closes every one of them
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_no_pool_without_fsync(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path, fsync=False)
    writer = store.create()
    assert not writer.precreated
    writer.write(b"abc")
    writer.commit()
    assert store._pool_thread is None
    store.close()
    assert len(_files(tmp_path)) == 1


@pytest.mark.parametrize("size", [256 << 10, (256 << 10) + 1, 700_001, 3 * 4096 + 4095])
def test_large_blobs_are_written_with_o_direct(tmp_path: Path, size: int) -> None:
    store = FileBlobStore(tmp_path, direct_io_min_size=12 * 1024)
    payload = os.urandom(size)
    head, body = payload[:132], bytearray(payload[132:])  # parts as the archive hands them
    writer = store.write([head, memoryview(body)])
    assert writer.commit() == size
    assert store.direct_writes == 1
    assert store.read(writer.key) == payload
    assert os.path.getsize(store.path(writer.key)) == size
    small = store.write([b"y" * 100])  # under the threshold: the buffered path
    small.commit()
    assert store.direct_writes == 1
    assert store.read(small.key) == b"y" * 100
    store.close()


def test_o_direct_refused_by_the_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without O_DIRECT (EINVAL): the blob is written normally, and the store
    stops trying."""
    real_write = os.write

    def write(fd: int, data: object) -> int:
        if files.fcntl.fcntl(fd, files.fcntl.F_GETFL) & files._O_DIRECT:
            raise OSError(files.errno.EINVAL, "Invalid argument")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(files.os, "write", write)
    store = FileBlobStore(tmp_path, direct_io_min_size=4096)
    payload = os.urandom(300_000)
    writer = store.write([payload])
    writer.commit()
    assert store.read(writer.key) == payload
    assert store.direct_writes == 0 and store.direct_io_min_size == 0
    store.close()


def test_o_direct_off(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path, direct_io_min_size=0)
    writer = store.write([os.urandom(1 << 20)])
    writer.commit()
    assert store.direct_writes == 0
    store.close()


def _fs_type(path: Path) -> str:
    """The type of the file system holding *path* (the longest mount point above it)."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        mount, fstype = line.split()[1:3]
        if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def _resident_pages(path: Path) -> int:
    """Pages of *path* in the page cache (mincore(2) over a mapping of it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_written_pages_leave_the_page_cache_after_the_fsync(tmp_path: Path) -> None:
    """drop_written_pages: a committed blob's pages are not kept cached (they are clean once
    fsynced); without it, or without fsync, they stay."""
    if _fs_type(tmp_path) == "tmpfs":
        pytest.skip("tmp_path is on tmpfs, whose pages never leave memory")
    payload = os.urandom(5 * 4096 + 100)
    kept_store = FileBlobStore(tmp_path / "kept", drop_written_pages=False)
    kept = kept_store.write([payload])
    kept.commit()
    dropping = FileBlobStore(tmp_path / "dropped", drop_written_pages=True)
    dropped = dropping.write([payload[:100], payload[100:]])
    dropped.commit()
    streamed = dropping.create()  # written in pieces, as a large data set arrives
    for i in range(0, len(payload), 4096):
        streamed.write(payload[i : i + 4096])
    streamed.commit()
    unsynced_store = FileBlobStore(tmp_path / "unsynced", fsync=False, drop_written_pages=True)
    unsynced = unsynced_store.write([payload])
    unsynced.commit()  # no fsync: dirty pages are not dropped (the kernel writes them later)

    assert _resident_pages(kept_store.path(kept.key)) == 6
    assert _resident_pages(dropping.path(dropped.key)) == 0
    assert _resident_pages(dropping.path(streamed.key)) == 0
    assert _resident_pages(unsynced_store.path(unsynced.key)) == 6
    assert dropping.read(dropped.key) == payload == dropping.read(streamed.key)
    for store in (kept_store, dropping, unsynced_store):
        store.close()


def test_a_blob_counts_as_open_until_its_row_is_filed(tmp_path: Path) -> None:
    """Recovery starts its scan at the oldest blob whose index row may not be committed yet:
    a blob fsynced before its row still counts until filed()."""
    store = FileBlobStore(tmp_path)
    blob = store.write([b"x" * 100])
    created = store.oldest_open()
    assert created is not None
    blob.commit(filed=False)
    assert store.oldest_open() == created
    blob.filed()
    assert store.oldest_open() is None
    other = store.write([b"y"])
    other.commit(filed=False)
    other.abort()  # refused after the fsync: no longer waiting for a row either
    assert store.oldest_open() is None
    store.close()
