"""The `openpacs` command line: serve, import, studies.

Owns: argument parsing (command names and flags are public interface), logging setup, and the
human output of each command. Must not: contain archive logic (it calls services).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from openpacs import __version__
from openpacs.config import Config, ConfigError, apply_overrides, load_config


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
                reason = result.comment + (f" ({result.detail})" if result.detail else "")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openpacs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"openpacs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML config file")
        p.add_argument("--data-dir", help="data folder (default ./openpacs-data)")
        p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    serve = sub.add_parser("serve", help="run the archive (DICOM listener; HTTP and HL7 to come)")
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
