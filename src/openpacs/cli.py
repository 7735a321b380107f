"""The `openpacs` command line: serve, import, studies, worklist, mpps, modality.

Owns: argument parsing (command names and flags are public interface), logging setup, and the
human output of each command. Must not: contain archive logic (it calls services).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from openpacs import __version__
from openpacs.config import Config, ConfigError, apply_overrides, load_config

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LineFormatter(logging.Formatter):
    """logging's default line, its time text made once per second instead of by
    ``time.strftime`` for every record (a line per stored instance is on the hot path:
    ``formatTime`` was 1.2 % of the server's CPU at 64 x 64 with 4 associations)."""

    def __init__(self, fmt: str = LOG_FORMAT) -> None:
        super().__init__(fmt)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached, text = self._second
        if second != cached:
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, text)
        return f"{text},{int(record.msecs):03d}"  # logging's default_msec_format "%s,%03d"


def _setup_logging(level: str) -> None:
    # The format names no source file, line, thread or process: don't compute them for every
    # record (the logging HOWTO's "Optimization"; a line per stored instance is on the hot path).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[handler])
    # pynetdicom and pydicom only decode for us; a peer's malformed PDU or value is reported
    # once by our own code (with the peer's address and AE title), not as their tracebacks.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


def _config_from(args: argparse.Namespace) -> Config:
    config = load_config(Path(args.config) if args.config else None)
    return apply_overrides(
        config,
        data_dir=Path(args.data_dir) if getattr(args, "data_dir", None) else None,
        ae_title=getattr(args, "ae_title", None),
        dicom_port=getattr(args, "dicom_port", None),
        http_port=getattr(args, "http_port", None),
        hl7_port=getattr(args, "hl7_port", None),
        host=getattr(args, "host", None),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from openpacs.server import Server

    config = _config_from(args)
    _setup_logging(args.log_level or config.logging.level)
    Server(config).serve_forever()
    return 0


def _walk(paths: Sequence[str]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for file in sorted(files):
                    if file.upper() == "DICOMDIR":
                        continue  # the directory record file, not an instance
                    yield Path(root) / file
        else:
            yield path


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from openpacs.services.archive import Archive

    config = _config_from(args)
    _setup_logging(args.log_level or "WARNING")
    files = list(_walk(args.paths))
    missing = [p for p in files if not p.exists()]
    archive = Archive(config)
    archive.recover()
    stored = duplicates = 0
    failed: list[tuple[Path, str]] = [(p, "no such file") for p in missing]
    try:
        bar = tqdm(
            [p for p in files if p.exists()],
            unit="file",
            disable=args.quiet or None,
            file=sys.stderr,
        )
        for path in bar:
            result = archive.import_file(path)
            if not result.ok:
                reason = (result.comment or "") + (f" ({result.detail})" if result.detail else "")
                failed.append((path, f"0x{result.status.code:04X} {reason}"))
            elif result.outcome in ("ignored", "replaced", "kept-duplicate"):
                duplicates += 1
            else:
                stored += 1
    finally:
        archive.close(clean=True)
    print(f"stored: {stored}  duplicates: {duplicates}  failed: {len(failed)}")
    for path, reason in failed:
        print(f"  FAILED {path}: {reason}")
    return 1 if failed else 0


def cmd_studies(args: argparse.Namespace) -> int:
    from openpacs.services.archive import Archive

    config = _config_from(args)
    _setup_logging(args.log_level or "WARNING")
    archive = Archive(config)
    try:
        rows = archive.index.list_studies(args.limit)
    finally:
        archive.close(clean=False)
    print(
        f"{'PATIENT ID':<16} {'PATIENT NAME':<24} {'DATE':<8} {'ACCESSION':<16} {'MOD':<8} "
        f"{'SER':>4} {'INST':>6}  STUDY UID / DESCRIPTION"
    )
    for row in rows:
        print(
            f"{(row.patient_id or '')[:16]:<16} {(row.patient_name or '')[:24]:<24} "
            f"{row.study_date or '':<8} {(row.accession_number or '')[:16]:<16} "
            f"{(row.modalities or '')[:8]:<8} {row.num_series:>4} {row.num_instances:>6}  "
            f"{row.study_uid}  {row.study_description or ''}"
        )
    print(f"{len(rows)} studies")
    return 0


@contextlib.contextmanager
def _ris(args: argparse.Namespace) -> Iterator[tuple[Config, Any, Any]]:
    """The worklist and MPPS services on the configured index (for the CLI commands)."""
    from openpacs.index import db
    from openpacs.services.mpps import MppsService
    from openpacs.services.worklist import WorklistService

    config = _config_from(args)
    _setup_logging(args.log_level or "WARNING")
    config.storage.data_dir.mkdir(parents=True, exist_ok=True)
    engine = db.make_engine(config.index_url, busy_timeout=config.index.busy_timeout)
    db.create_schema(engine)
    lock = config.storage.data_dir / "index.lock" if db.is_sqlite(engine) else None
    writer = db.IndexWriter(engine, lock_path=lock)
    worklist = WorklistService(engine, writer, config.query.max_results)
    try:
        yield config, worklist, MppsService(config, engine, writer, worklist)
    finally:
        writer.close()
        engine.dispose()


def _code(text: str | None) -> tuple[Any, ...]:
    """'VALUE^Meaning^SCHEME' → one Code (the HL7 CE order)."""
    from openpacs.services.orders import Code

    if not text:
        return ()
    value, meaning, scheme = ([*text.split("^"), "", ""])[:3]
    return (Code(value=value, scheme=scheme or "L", meaning=meaning),)


def cmd_worklist(args: argparse.Namespace) -> int:
    import datetime as dt

    from openpacs.dicom.uids import generate_uid
    from openpacs.services.orders import (
        CancelOrder,
        NewOrder,
        OrderError,
        Patient,
        WorklistItem,
    )

    with _ris(args) as (_config, worklist, _mpps):
        if args.action == "add":
            try:
                item = WorklistItem(
                    patient=Patient(
                        patient_id=args.patient_id,
                        issuer=args.issuer or "",
                        name=args.patient_name or "",
                        birth_date=args.birth_date,
                        sex=args.sex,
                    ),
                    accession_number=args.accession,
                    requested_procedure_id=args.requested_procedure_id or args.accession,
                    sps_id=args.sps_id or f"{args.accession}-1"[:16],
                    study_uid=args.study_uid or generate_uid(),
                    modality=args.modality,
                    sps_start_date=args.date or dt.date.today().strftime("%Y%m%d"),
                    sps_start_time=args.time or "000000",
                    station_ae=args.station_ae,
                    station_name=args.station_name,
                    sps_description=args.description,
                    requested_procedure_description=args.description,
                    requested_procedure_codes=_code(args.procedure),
                    protocol_codes=_code(args.procedure),
                    referring_physician=args.referring_physician,
                    priority=args.priority,
                )
                done = worklist.apply([NewOrder(item)], "cli")
            except OrderError as exc:
                print(f"openpacs: {exc}", file=sys.stderr)
                return 2
            print(f"{done[0]} (Study Instance UID {item.study_uid})")
            return 0
        if args.action == "cancel":
            try:
                done = worklist.apply([CancelOrder(None, None, args.accession)], "cli")
            except OrderError as exc:
                print(f"openpacs: {exc}", file=sys.stderr)
                return 1
            print(done[0])
            return 0
        rows = worklist.list(include_closed=args.all, date=args.date)
        print(
            f"{'ACCESSION':<16} {'SPS ID':<16} {'DATE':<8} {'TIME':<6} {'MOD':<4} "
            f"{'STATION AE':<16} {'STATUS':<12} {'PATIENT ID':<16} PATIENT NAME"
        )
        for r in rows:
            print(
                f"{r.accession_number:<16} {(r.sps_id or ''):<16} {r.sps_start_date or '':<8} "
                f"{r.sps_start_time or '':<6} {r.modality or '':<4} {(r.station_ae or ''):<16} "
                f"{r.status:<12} {r.patient_id:<16} {r.patient_name or ''}"
            )
        print(f"{len(rows)} worklist items")
        return 0


def cmd_mpps(args: argparse.Namespace) -> int:
    with _ris(args) as (_config, _worklist, mpps):
        rows = mpps.list()
    print(
        f"{'STATUS':<13} {'STARTED':<15} {'MOD':<4} {'STATION AE':<16} {'ACCESSION':<16} "
        f"{'IMAGES':>13}  SOP INSTANCE UID"
    )
    for r in rows:
        referenced, stored = r["referenced"] or 0, r["stored"] or 0
        complete = "complete" if referenced and stored == referenced else "missing"
        images = f"{stored}/{referenced}" + ("" if not referenced else f" {complete}")
        print(
            f"{r['status']:<13} {(r['start_date'] or '') + ' ' + (r['start_time'] or ''):<15} "
            f"{(r['modality'] or ''):<4} {(r['station_ae'] or ''):<16} "
            f"{(r['accession_number'] or ''):<16} {images:>13}  {r['sop_uid']}"
            f"{'' if r['scheduled'] else '  (unscheduled)'}"
        )
    print(f"{len(rows)} performed procedure steps")
    return 0


def cmd_mpps_show(args: argparse.Namespace) -> int:
    with _ris(args) as (_config, _worklist, mpps):
        ds = mpps.get(args.sop_uid)
    if ds is None:
        print(f"no MPPS {args.sop_uid}", file=sys.stderr)
        return 1
    print(json.dumps(ds.to_json_dict(), indent=1, ensure_ascii=False) if args.json else ds)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openpacs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"openpacs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML config file")
        p.add_argument("--data-dir", help="data folder (default ./openpacs-data)")
        p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    serve = sub.add_parser("serve", help="run the archive (DICOM, DICOMweb/HTTP and HL7 listeners)")
    common(serve)
    serve.add_argument("--ae-title", help="our AE title (default OPENPACS)")
    serve.add_argument("--dicom-port", type=int, help="DICOM port (default 11112)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 8080)")
    serve.add_argument("--hl7-port", type=int, help="HL7 MLLP port (default 2575)")
    serve.add_argument("--host", help="address every listener binds to")
    serve.set_defaults(func=cmd_serve)

    imp = sub.add_parser("import", help="import DICOM files and folders into the archive")
    common(imp)
    imp.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    imp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    imp.set_defaults(func=cmd_import)

    studies = sub.add_parser("studies", help="list stored studies")
    common(studies)
    studies.add_argument("--limit", type=int, default=None)
    studies.set_defaults(func=cmd_studies)
    wl = sub.add_parser("worklist", help="the modality worklist: add, list, cancel items")
    wl_sub = wl.add_subparsers(dest="action", required=True)
    add = wl_sub.add_parser("add", help="schedule a procedure step")
    list_ = wl_sub.add_parser("list", help="list scheduled steps")
    cancel = wl_sub.add_parser("cancel", help="cancel an order (its steps leave the worklist)")
    for p in (add, list_, cancel):
        common(p)
        p.set_defaults(func=cmd_worklist)
    add.add_argument("--patient-id", required=True)
    add.add_argument("--issuer", help="Issuer of Patient ID")
    add.add_argument("--patient-name", help="DICOM form: Family^Given")
    add.add_argument("--birth-date", help="YYYYMMDD")
    add.add_argument("--sex", choices=["M", "F", "O"])
    add.add_argument("--accession", required=True)
    add.add_argument("--modality", required=True)
    add.add_argument("--date", help="SPS start date YYYYMMDD (default today)")
    add.add_argument("--time", help="SPS start time HHMM[SS]")
    add.add_argument("--station-ae", help="Scheduled Station AE Title")
    add.add_argument("--station-name")
    add.add_argument("--description", help="procedure description")
    add.add_argument("--procedure", help="procedure code VALUE^Meaning^SCHEME")
    add.add_argument("--referring-physician")
    add.add_argument(
        "--priority", default="ROUTINE", choices=["STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW"]
    )
    add.add_argument("--study-uid", help="Study Instance UID (default: generated)")
    add.add_argument("--requested-procedure-id")
    add.add_argument("--sps-id")
    list_.add_argument("--all", action="store_true", help="include completed and cancelled")
    list_.add_argument("--date", help="only this SPS start date")
    cancel.add_argument("accession")

    mp = sub.add_parser("mpps", help="performed procedure steps")
    mp_sub = mp.add_subparsers(dest="action", required=True)
    mp_list = mp_sub.add_parser("list", help="state and completeness of each MPPS")
    common(mp_list)
    mp_list.set_defaults(func=cmd_mpps)
    mp_show = mp_sub.add_parser("show", help="every attribute kept for one MPPS")
    common(mp_show)
    mp_show.add_argument("sop_uid", help="the MPPS SOP Instance UID")
    mp_show.add_argument("--json", action="store_true", help="DICOM JSON model (PS3.18 F.2)")
    mp_show.set_defaults(func=cmd_mpps_show)

    from openpacs.modality.cli import add_parser as add_modality

    add_modality(sub, _setup_logging)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"openpacs: invalid configuration: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
