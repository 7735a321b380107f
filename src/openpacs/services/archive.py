"""The archive: the one ingest path for every way an instance arrives (C-STORE, import, STOW-RS).

Owns: turning received bytes into a durably stored, indexed instance and a DIMSE status —
streaming a data set to memory or (beyond ``SPILL_BYTES``) straight into its blob file, scanning
its header, refusing what cannot be filed (C00B, C011, C016, A900, C000), applying the duplicate
policy, writing the blob (fsynced) *before* the index transaction that names it commits, and only
then answering success; replaced blobs are deleted after the commit. At start, files left
without an index row by a crash are removed.
Must not: speak a network protocol (adapters in ``dimse/``, ``web/`` call it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from openpacs.blobs.files import BlobWriter, FileBlobStore
from openpacs.config import Config
from openpacs.dicom.header import (
    INDEX_TAGS,
    DatasetFormatError,
    ScannedHeader,
    scan_dataset,
    scan_part10,
)
from openpacs.dicom.part10 import encode_file_meta
from openpacs.dicom.transfer_syntaxes import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from openpacs.dimse import status as st
from openpacs.dimse.status import Status
from openpacs.index import db
from openpacs.index.instances import (
    CLASS_CONFLICT,
    IGNORED,
    KEPT_DUPLICATE,
    NEEDS_DURABLE_BLOB,
    REJECTED,
    REPLACED,
    InstanceIndex,
    StoreOutcome,
)
from openpacs.services import records
from openpacs.services.records import MissingElement, build_record

log = logging.getLogger(__name__)

SPILL_BYTES = 8 << 20  # data sets larger than this go to disk as they arrive
RUN_DIR = "run"


@dataclass
class StoreResult:
    status: Status
    comment: str | None = None
    outcome: str | None = None  # stored | replaced | kept-duplicate | ignored
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    size: int = 0
    detail: str | None = None  # the full reason, for logs and the import summary
    # Filled by import_blob (STOW-RS needs them for its response); None elsewhere.
    sop_class_uid: str | None = None
    series_instance_uid: str | None = None
    # finish(): the "stored" log line, for Archive.log_stored once the response is on its way
    log_args: tuple[object, ...] | None = None

    @property
    def ok(self) -> bool:
        return self.status.code == 0x0000


class IncomingInstance:
    """The data set of one C-STORE (or similar) as it arrives; a DatasetSink."""

    def __init__(
        self,
        archive: Archive,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str | None,
    ) -> None:
        self.archive = archive
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.calling_ae = calling_ae
        self.meta = encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae)
        self.buffer = bytearray()
        self.blob: BlobWriter | None = None
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: memoryview) -> None:
        if self.error is not None:
            return  # keep draining the association; the failure is reported at the end
        self.size += len(data)
        if self.blob is None:
            self.buffer += data
            if len(self.buffer) > SPILL_BYTES:
                try:
                    self.blob = self.archive.blobs.create()
                    self.blob.write(self.meta)
                    self.blob.write(self.buffer)
                except OSError as exc:
                    self._fail(exc)
                self.buffer = bytearray()
            return
        try:
            self.blob.write(data)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        if self.blob is not None:
            self.blob.abort()
            self.blob = None
        self.buffer = bytearray()

    def close(self) -> None:
        pass

    def discard(self) -> None:
        if self.blob is not None:
            self.blob.abort()
            self.blob = None
        self.buffer = bytearray()


class Archive:
    def __init__(self, config: Config, engine: Engine | None = None) -> None:
        self.config = config
        data_dir = config.storage.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.blobs = FileBlobStore(
            data_dir / "blobs",
            fsync=config.storage.fsync,
            direct_io_min_size=config.storage.direct_io_min_size,
            drop_written_pages=config.storage.drop_written_pages,
        )
        self.engine = engine or db.make_engine(
            config.index_url, busy_timeout=config.index.busy_timeout
        )
        db.create_schema(self.engine)
        self.writer = db.IndexWriter(
            self.engine, lock_path=data_dir / "index.lock" if db.is_sqlite(self.engine) else None
        )
        self.index = InstanceIndex(self.engine, self.writer)
        self.policy = config.storage.duplicate_policy
        self._run_file: Path | None = None
        self._run_info: dict[str, object] = {}

    # ------------------------------------------------------------------ lifecycle
    def recover(self) -> int:
        """Finish what a crashed process left: every process using the data folder registers in
        ``run/<token>.json`` (its blob-key prefix, pid, start time, and the time through which
        its index commits are known durable) and removes the file when it stops cleanly. For a
        registered process that is gone, its blobs written since that time that no row names
        are re-indexed when complete (a blob is fsynced before its row is written, so such a
        blob may be an acknowledged instance whose row a power loss took) and deleted when not
        (a transfer cut off mid-way). Live processes' blobs are never touched.
        Returns the number of blobs re-indexed or removed."""
        run_dir = self.data_dir / RUN_DIR
        run_dir.mkdir(exist_ok=True)
        handled = 0
        for entry in sorted(run_dir.glob("*.json")):
            try:
                info = json.loads(entry.read_text())
                token, pid = str(info["token"]), int(info["pid"])
                through = float(info.get("durable_through", info["started"]))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("recovery: unreadable run file %s removed", entry)
                entry.unlink(missing_ok=True)
                continue
            if _process_alive(pid):
                continue
            t0 = time.monotonic()
            # Rows whose blob is missing or short: filed while the blob's fsync ran, and the
            # power failed before it finished (never acknowledged).
            broken = []
            for prefix in self.blobs.hour_prefixes(through - 3600, time.time()):
                for row in self.index.rows_with_key_prefix(prefix + token):
                    if not self._blob_matches(row.blob_key, row.size, recent_after=through - 60):
                        broken.append(row.pk)
            self.index.delete_instances(broken)
            candidates = list(self.blobs.keys(since=through - 3600, token=token))
            known = self.index.existing_blob_keys(candidates)
            reindexed = removed = 0
            for key in candidates:
                if key in known:
                    continue
                if self.reindex_blob(key):
                    reindexed += 1
                else:
                    removed += 1
            handled += reindexed + removed
            entry.unlink(missing_ok=True)
            log.warning(
                "recovery: process %d (blob prefix %s) did not stop cleanly; %d of its blob files "
                "checked in %.1f s: %d without an index row re-indexed, %d incomplete removed, "
                "%d rows without their blob removed",
                pid,
                token,
                len(candidates),
                time.monotonic() - t0,
                reindexed,
                removed,
                len(broken),
            )
        self.register()
        return handled

    def register(self) -> None:
        """Announce this process in ``run/`` (see :meth:`recover`) before it writes blobs."""
        run_dir = self.data_dir / RUN_DIR
        run_dir.mkdir(exist_ok=True)
        started = time.time()
        self._run_file = run_dir / f"{self.blobs.token}.json"
        self._run_info = {"token": self.blobs.token, "pid": os.getpid(), "started": started}
        self._write_run_file(started)
        FileBlobStore.sync_dir(run_dir)
        self.writer.horizon = self.blobs.oldest_open
        self.writer.on_durable.append(self._index_durable)

    def _blob_matches(self, key: str, size: int, recent_after: float) -> bool:
        """The blob exists with the recorded size; if written recently, its header parses."""
        path = self.blobs.path(key)
        try:
            stat = path.stat()
            if stat.st_size != size:
                return False
            if stat.st_mtime < recent_after:
                return True
            with open(path, "rb") as fh:
                scan_part10(fh.read())
            return True
        except (OSError, DatasetFormatError):
            return False

    def _write_run_file(self, durable_through: float) -> None:
        assert self._run_file is not None
        tmp = self._run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self._run_info, "durable_through": durable_through}))
        os.replace(tmp, self._run_file)

    def _index_durable(self, through: float) -> None:
        """Index commits before *through* are durable, and no blob created before it is still
        waiting for its row (IndexWriter.horizon): recovery may start its scan there."""
        try:
            self._write_run_file(through)
        except OSError:
            log.exception("could not update %s", self._run_file)

    def reindex_blob(self, key: str) -> bool:
        """Index an existing blob (recovery). False, and the blob is deleted, when it is not a
        complete instance or the duplicate policy refuses it."""
        path = self.blobs.path(key)
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError:
            mapped = None
        if mapped is None:
            self.blobs.delete(key)
            return False
        outcome: StoreOutcome | None = None
        view = memoryview(mapped)
        try:
            meta, header = scan_part10(view)
            record = build_record(header, meta.transfer_syntax)
            record.instance["dataset_offset"] = meta.dataset_offset
            outcome = self.index.store(record, key, size, None, self.policy, True).result()
        except (DatasetFormatError, MissingElement) as exc:
            log.warning("recovery: blob %s is not a complete instance (%s); removed", key, exc)
        finally:
            with contextlib.suppress(BufferError):
                view.release()
                mapped.close()
        if outcome is None or outcome.kind in (CLASS_CONFLICT, IGNORED, REJECTED):
            self.blobs.delete(key)
            return False
        for old in outcome.replaced_blob_keys:
            self.blobs.delete(old)
        log.info("recovery: re-indexed %s (blob %s)", record.sop_uid, key)
        return True

    def close(self, *, clean: bool = True) -> None:
        self.blobs.close()
        self.writer.close()
        self.engine.dispose()
        if clean and self._run_file is not None:
            self._run_file.unlink(missing_ok=True)
            FileBlobStore.sync_dir(self._run_file.parent)

    # ------------------------------------------------------------------ ingest
    def begin(
        self,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str | None,
    ) -> IncomingInstance:
        return IncomingInstance(self, sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae)

    def finish(self, incoming: IncomingInstance, via: str = "C-STORE") -> StoreResult:
        """Scan, validate, store and index a complete incoming data set. The caller logs the
        success with :meth:`log_stored` after answering."""
        if incoming.error is not None:
            return self._blob_failure(incoming.error, incoming.sop_instance_uid)
        blob = incoming.blob
        mapped: mmap.mmap | None = None
        try:
            if blob is None:
                dataset: memoryview | bytearray = memoryview(incoming.buffer)
            else:
                fd = os.open(blob.path, os.O_RDONLY)
                try:
                    mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if blob.size else None
                finally:
                    os.close(fd)
                dataset = memoryview(mapped)[len(incoming.meta) :] if mapped else memoryview(b"")
            result = self._file(
                dataset,
                transfer_syntax=incoming.transfer_syntax,
                expected_class=incoming.sop_class_uid,
                expected_instance=incoming.sop_instance_uid,
                calling_ae=incoming.calling_ae,
                via=via,
                write_blob=(lambda: self._write_buffered(incoming))
                if blob is None
                else (lambda: blob),
                drop_blob=incoming.discard,
                dataset_offset=len(incoming.meta),
                defer_log=True,
            )
            del dataset
            return result
        finally:
            if mapped is not None:
                with contextlib.suppress(BufferError):
                    mapped.close()

    def _write_buffered(self, incoming: IncomingInstance) -> BlobWriter:
        writer = self.blobs.write([incoming.meta, incoming.buffer])
        incoming.buffer = bytearray()
        return writer

    def _file(
        self,
        dataset: memoryview | bytearray | mmap.mmap,
        *,
        transfer_syntax: str,
        expected_class: str | None,
        expected_instance: str | None,
        calling_ae: str | None,
        via: str,
        write_blob: Callable[[], BlobWriter],
        drop_blob: Callable[[], None],
        dataset_offset: int,
        header: ScannedHeader | None = None,
        defer_log: bool = False,
    ) -> StoreResult:
        sop_uid = expected_instance
        try:
            scanned = (
                header if header is not None else scan_dataset(dataset, transfer_syntax, INDEX_TAGS)
            )
            record = build_record(scanned, transfer_syntax)
            record.instance["dataset_offset"] = dataset_offset
        except DatasetFormatError as exc:
            drop_blob()
            return self._refuse(
                st.STORE_CANNOT_UNDERSTAND,
                "Cannot parse the data set",
                sop_uid,
                calling_ae,
                via,
                detail=str(exc),
            )
        except MissingElement as exc:
            drop_blob()
            return self._refuse(
                st.STORE_REQUIRED_ELEMENT_MISSING,
                f"Missing {exc.names}",
                sop_uid,
                calling_ae,
                via,
                detail=str(exc),
            )
        if expected_class and record.sop_class_uid != expected_class:
            drop_blob()
            return self._refuse(
                st.STORE_SOP_CLASS_MISMATCH,
                "SOP Class UID in data set does not match request",
                sop_uid,
                calling_ae,
                via,
                detail=f"data set {record.sop_class_uid}, request {expected_class}",
            )
        if expected_instance and record.sop_uid != expected_instance:
            drop_blob()
            return self._refuse(
                st.STORE_REJECTED,
                "Reject: SOP Instance UID in data set does not match request",
                sop_uid,
                calling_ae,
                via,
                detail=f"data set {record.sop_uid}, request {expected_instance}",
            )
        sop_uid = record.sop_uid
        if self.policy in ("ignore", "reject"):
            early = self._duplicate_precheck(record.sop_uid, record.sop_class_uid)
            if early is not None:
                drop_blob()
                return self._duplicate_result(
                    early, record.sop_uid, record.study_uid, calling_ae, via
                )

        try:
            blob = write_blob()
        except OSError as exc:
            drop_blob()
            return self._blob_failure(exc, sop_uid)
        size = blob.size
        # The row is filed while the blob's fsync runs (the writer thread works while this one
        # waits on the disk). Success is answered only after both finished. If power fails in
        # between, the row may name a blob that never reached the disk: that instance was not
        # acknowledged, and recover() removes such rows. Replacing an existing instance waits
        # for the fsync instead (NEEDS_DURABLE_BLOB), so an acknowledged copy is never traded
        # for one that is not yet on disk.
        try:
            pending = self.index.store(record, blob.key, size, calling_ae, self.policy, False)
        except Exception as exc:
            blob.abort()
            return self._index_failure(exc, sop_uid)
        sync_error: OSError | None = None
        try:
            blob.commit(filed=False)  # counts as unfiled until its row is committed
        except OSError as exc:
            sync_error = exc
        try:
            outcome = pending.result()
            if outcome.kind == NEEDS_DURABLE_BLOB and sync_error is None:
                outcome = self.index.store(
                    record, blob.key, size, calling_ae, self.policy, True
                ).result()
        except Exception as exc:
            blob.abort()
            return self._index_failure(exc, sop_uid)
        blob.filed()
        if outcome.kind in (CLASS_CONFLICT, IGNORED, REJECTED, NEEDS_DURABLE_BLOB):
            blob.abort()
            if sync_error is not None:
                return self._blob_failure(sync_error, sop_uid)
            return self._duplicate_result(
                outcome, record.sop_uid, record.study_uid, calling_ae, via
            )
        if sync_error is not None:  # the row is committed but its blob is not durable
            try:
                assert outcome.instance_pk is not None
                self.index.delete_instance(outcome.instance_pk)
            except Exception:
                log.exception("could not take back the row of %s; recovery will", sop_uid)
            blob.abort()
            return self._blob_failure(sync_error, sop_uid)
        for old in outcome.replaced_blob_keys:
            self.blobs.delete(old)
        result = StoreResult(st.SUCCESS, None, outcome.kind, record.sop_uid, record.study_uid, size)
        result.log_args = (
            record.modality or "-",
            record.sop_uid,
            record.study_uid,
            record.patient_key[0],
            calling_ae or "-",
            via,
            size,
            {REPLACED: ", replaced the earlier copy", KEPT_DUPLICATE: ", duplicate kept"}.get(
                outcome.kind, ""
            ),
        )
        if not defer_log:
            self.log_stored(result)
        return result

    @staticmethod
    def log_stored(result: StoreResult) -> None:
        """The "stored" line of a successful store (finish() leaves it to its caller, which
        answers the SCU first: at one association the line is otherwise on its critical path)."""
        if result.log_args is not None:
            log.info(
                "stored %s %s (study %s, patient %r) from %s via %s, %d bytes%s", *result.log_args
            )
            result.log_args = None

    def _duplicate_precheck(self, sop_uid: str, sop_class_uid: str) -> StoreOutcome | None:
        try:
            rows = self.index.find_by_sop_uid(sop_uid)
        except SQLAlchemyError:
            return None  # the writer re-checks inside its transaction
        if not rows:
            return None
        for row in rows:
            if row.sop_class_uid != sop_class_uid:
                return StoreOutcome(CLASS_CONFLICT, existing_class=row.sop_class_uid)
        return StoreOutcome(IGNORED if self.policy == "ignore" else REJECTED)

    def _duplicate_result(
        self, outcome: StoreOutcome, sop_uid: str, study_uid: str, calling_ae: str | None, via: str
    ) -> StoreResult:
        kind = outcome.kind
        if kind == CLASS_CONFLICT:
            return self._refuse(
                st.STORE_SOP_CLASS_CONFLICT,
                "Same SOP Instance with different SOP Class",
                sop_uid,
                calling_ae,
                via,
                detail=f"stored as {outcome.existing_class}",
            )
        if kind == REJECTED:
            return self._refuse(
                st.STORE_REJECTED,
                "Reject: already stored (duplicate_policy = reject)",
                sop_uid,
                calling_ae,
                via,
            )
        log.info(
            "duplicate %s from %s via %s ignored (duplicate_policy = ignore)",
            sop_uid,
            calling_ae or "-",
            via,
        )
        return StoreResult(st.SUCCESS, None, IGNORED, sop_uid, study_uid, 0)

    def _refuse(
        self,
        status: Status,
        comment: str,
        sop_uid: str | None,
        calling_ae: str | None,
        via: str,
        *,
        detail: str | None = None,
    ) -> StoreResult:
        """A refusal: *comment* goes to the peer (Error Comment is LO: at most 64 characters),
        *detail* only to the log."""
        log.warning(
            "refused %s from %s via %s: 0x%04X %s%s",
            sop_uid or "-", calling_ae or "-", via, status.code, comment,
            f" ({detail})" if detail else "",
        )  # fmt: skip
        return StoreResult(status, comment[:64], None, sop_uid, detail=detail)

    def _blob_failure(self, exc: OSError, sop_uid: str | None) -> StoreResult:
        reason = (
            "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "I/O error"
        )
        comment = f"Out of resources: cannot write blob ({reason})"
        log.error("storing %s failed: %s: %s", sop_uid or "-", comment, exc)
        return StoreResult(st.STORE_OUT_OF_RESOURCES, comment, None, sop_uid, detail=str(exc))

    def _index_failure(self, exc: Exception, sop_uid: str | None) -> StoreResult:
        if isinstance(exc, OperationalError | db.IndexUnavailable):
            comment, status = "Out of resources: index unavailable", st.STORE_INDEX_UNAVAILABLE
        else:
            comment = "Out of resources: index operation failed"
            status = st.STORE_INDEX_OPERATION_FAILED
        log.error(
            "indexing %s failed: %s: %s", sop_uid or "-", comment, _short(exc),
            exc_info=not isinstance(exc, SQLAlchemyError),
        )  # fmt: skip
        return StoreResult(status, comment, None, sop_uid, detail=_short(exc))

    # ------------------------------------------------------------------ import
    def import_file(self, path: Path) -> StoreResult:
        """Store one file through the same path as C-STORE. The blob is the file's bytes; a bare
        data set without File Meta Information (older files) gets our meta in front of it."""
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as exc:
            return StoreResult(st.STORE_CANNOT_UNDERSTAND, "Cannot read the file", detail=str(exc))
        if mapped is None:
            return StoreResult(st.STORE_CANNOT_UNDERSTAND, "Empty file")
        view = memoryview(mapped)
        try:
            prefix = b""
            try:
                meta, header = scan_part10(view)
                transfer_syntax, offset = meta.transfer_syntax, meta.dataset_offset
                expected_class, expected_instance = meta.sop_class_uid, meta.sop_instance_uid
            except DatasetFormatError as exc:
                bare = _scan_bare_dataset(view)
                if bare is None:
                    return StoreResult(
                        st.STORE_CANNOT_UNDERSTAND, "Not a DICOM file", detail=str(exc)
                    )
                transfer_syntax, header = bare
                offset = 0
                expected_class = expected_instance = None
                prefix = encode_file_meta(
                    header.text(records.T["SOPClassUID"]) or "",
                    header.text(records.T["SOPInstanceUID"]) or "",
                    transfer_syntax,
                )

            def copy_blob() -> BlobWriter:
                writer = self.blobs.create()
                try:
                    writer.write(prefix)
                    for start in range(0, size, 4 << 20):
                        writer.write(view[start : start + (4 << 20)])
                    return writer
                except BaseException:
                    writer.abort()
                    raise

            return self._file(
                view[offset:],
                transfer_syntax=transfer_syntax,
                expected_class=expected_class,
                expected_instance=expected_instance,
                calling_ae=None,
                via="import",
                write_blob=copy_blob,
                drop_blob=lambda: None,
                header=header,
                dataset_offset=len(prefix) + offset,
            )
        finally:
            with contextlib.suppress(BufferError):
                view.release()
                mapped.close()

    def import_blob(
        self,
        writer: BlobWriter,
        *,
        via: str,
        study_uid: str | None = None,
        sop_classes: Container[str] | None = None,
        transfer_syntaxes: Container[str] | None = None,
    ) -> StoreResult:
        """File a Part 10 file that was streamed straight into a new blob (STOW-RS writes each
        part into its blob as it arrives, so an instance of any size costs no memory) through the
        same path as C-STORE and import: the header is scanned, the instance checked, the blob
        fsynced and its row committed before success is returned. The blob is the file as
        received (its own File Meta Information kept, like ``import_file``).

        Refused before filing: no Part 10 File Meta Information or a malformed data set (C000);
        with *sop_classes*, a class not in it (0122); with *transfer_syntaxes*, a syntax not in it
        (C122); with *study_uid*, another Study Instance UID (A900). A refused blob is removed.
        The result names the instance's SOP Class and Series as far as they could be read."""
        size = writer.size
        try:
            fd = os.open(writer.path, os.O_RDONLY)
            try:
                mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
            finally:
                os.close(fd)
        except OSError as exc:
            writer.abort()
            return self._blob_failure(exc, None)
        if mapped is None:
            writer.abort()
            return self._refuse(st.STORE_CANNOT_UNDERSTAND, "Empty part", None, None, via)
        view = memoryview(mapped)
        try:
            try:
                meta, header = scan_part10(view)
            except DatasetFormatError as exc:
                writer.abort()
                return self._refuse(
                    st.STORE_CANNOT_UNDERSTAND,
                    "Not a DICOM Part 10 file, or its data set is malformed",
                    None,
                    None,
                    via,
                    detail=str(exc),
                )
            sop_class = header.text(records.T["SOPClassUID"]) or meta.sop_class_uid
            sop_uid = header.text(records.T["SOPInstanceUID"]) or meta.sop_instance_uid
            series_uid = header.text(records.T["SeriesInstanceUID"])
            found_study = header.text(records.T["StudyInstanceUID"])
            refusal: StoreResult | None = None
            if sop_classes is not None and sop_class and sop_class not in sop_classes:
                refusal = self._refuse(
                    st.SOP_CLASS_NOT_SUPPORTED,
                    "SOP Class not supported",
                    sop_uid,
                    None,
                    via,
                    detail=sop_class,
                )
            elif transfer_syntaxes is not None and meta.transfer_syntax not in transfer_syntaxes:
                refusal = self._refuse(
                    st.STORE_TRANSFER_SYNTAX_NOT_SUPPORTED,
                    "Transfer Syntax not supported",
                    sop_uid,
                    None,
                    via,
                    detail=meta.transfer_syntax,
                )
            elif study_uid is not None and found_study and found_study != study_uid:
                refusal = self._refuse(
                    st.STORE_SOP_CLASS_MISMATCH,
                    "Study Instance UID does not match the request",
                    sop_uid,
                    None,
                    via,
                    detail=f"data set {found_study}, request {study_uid}",
                )
            if refusal is not None:
                writer.abort()
                result = refusal
            else:
                result = self._file(
                    view[meta.dataset_offset :],
                    transfer_syntax=meta.transfer_syntax,
                    expected_class=meta.sop_class_uid,
                    expected_instance=meta.sop_instance_uid,
                    calling_ae=None,
                    via=via,
                    write_blob=lambda: writer,
                    drop_blob=writer.abort,
                    header=header,
                    dataset_offset=meta.dataset_offset,
                )
            del header
            result.sop_instance_uid = result.sop_instance_uid or sop_uid
            result.sop_class_uid = sop_class
            result.series_instance_uid = series_uid
            result.study_instance_uid = result.study_instance_uid or found_study
            return result
        finally:
            with contextlib.suppress(BufferError):
                view.release()
                mapped.close()


def _scan_bare_dataset(view: memoryview) -> tuple[str, ScannedHeader] | None:
    """A data set stored without preamble and File Meta (ACR-NEMA style files): try Explicit,
    then Implicit VR Little Endian; accept it only if it walks cleanly and names its instance."""
    for transfer_syntax in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        try:
            header = scan_dataset(view, transfer_syntax, INDEX_TAGS)
        except DatasetFormatError:
            continue
        if header.text(records.T["SOPInstanceUID"]) and header.text(records.T["SOPClassUID"]):
            return transfer_syntax, header
    return None


def _process_alive(pid: int) -> bool:
    """Whether *pid* is a running openpacs process (a reused pid of another program is not)."""
    if pid == os.getpid():
        return False  # a previous process that had our pid
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return b"openpacs" in cmdline


def _short(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0][:120] if text else type(exc).__name__
