"""`openpacs modality …`: the virtual modality's commands (worklist, run, echo, query, listen).

Owns: their arguments (names and flags are public interface), the human output (tables, one line
per step) and ``--json`` (one JSON document on stdout: every step, status and UID), and the exit
status: 0 when every step succeeded, 1 when one failed, 2 for a configuration or usage error.
Must not: speak DICOM or build objects itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from openpacs.config import ConfigError
from openpacs.modality.config import ModalityConfig, Peer, load_modality_config


def add_parser(sub: Any, setup_logging: Any) -> None:
    modality = sub.add_parser(
        "modality", help="a virtual DX/CR modality (seed 004) driving a PACS/RIS over DICOM"
    )
    msub = modality.add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML file with [modality], [worklist], [mpps], [[store]]…")
        p.add_argument("--json", action="store_true", help="a JSON summary on stdout")
        p.add_argument(
            "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
        )
        p.set_defaults(setup_logging=setup_logging)

    wl = msub.add_parser("worklist", help="query the worklist (today, our modality and station AE)")
    common(wl)
    wl.add_argument("--date", help="SPS start date YYYYMMDD (default today)")
    wl.add_argument("--all-dates", action="store_true", help="no date matching key")
    wl.add_argument("--any-station", action="store_true", help="no Scheduled Station AE Title key")
    wl.add_argument("--accession", help="Accession Number matching key")
    wl.add_argument("--patient-name", help="Patient's Name matching key (wildcards allowed)")
    wl.set_defaults(func=cmd_worklist)

    run = msub.add_parser(
        "run", help="perform an exam: MPPS, images + dose SR, store, commit, print"
    )
    common(run)
    which = run.add_mutually_exclusive_group()
    which.add_argument("--accession", help="the worklist item with this Accession Number")
    which.add_argument("--first", action="store_true", help="the first matching worklist item")
    which.add_argument("--unscheduled", action="store_true", help="a locally registered patient")
    run.add_argument("--images", type=int, default=1, help="images to acquire (default 1)")
    run.add_argument("--discontinue", metavar="REASON", help="end the MPPS DISCONTINUED (CID 9300)")
    run.add_argument(
        "--print", dest="print_films", action="store_true", help="film via [[printer]]"
    )
    run.add_argument("--anatomy", default="chest", help="anatomy imaged (CID 4009 key)")
    run.add_argument("--patient-id", help="with --unscheduled")
    run.add_argument("--patient-name", help="with --unscheduled (Family^Given)")
    run.add_argument("--birth-date", default="", help="with --unscheduled (YYYYMMDD)")
    run.add_argument("--sex", default="", choices=["", "M", "F", "O"], help="with --unscheduled")
    run.add_argument("--unscheduled-accession", default="", help="with --unscheduled")
    run.add_argument(
        "--commit-timeout",
        type=float,
        help="seconds to wait for the report on the same association",
    )
    run.add_argument("--commit-wait", type=float, help="seconds to wait for the report in all")
    run.add_argument("--received-dir", help="where images sent to the modality are kept")
    run.set_defaults(func=cmd_run)

    echo = msub.add_parser("echo", help="C-ECHO every configured peer")
    common(echo)
    echo.set_defaults(func=cmd_echo)

    listen = msub.add_parser(
        "listen", help="run the modality's listener: C-ECHO, C-STORE (CR/DX/SC), commitment reports"
    )
    common(listen)
    listen.add_argument("--received-dir", default="received", help="where received images go")
    listen.add_argument(
        "--seconds", type=float, help="stop after this long (default: until signal)"
    )
    listen.set_defaults(func=cmd_listen)

    query = msub.add_parser("query", help="Study Root C-FIND (seed 004 T3-37) to a [[store]] peer")
    common(query)
    query.add_argument(
        "--peer", type=int, default=0, help="index of the [[store]] peer (default 0)"
    )
    query.add_argument("--patient-name")
    query.add_argument("--patient-id")
    query.add_argument("--accession")
    query.add_argument("--study-date", help="YYYYMMDD or a range")
    query.set_defaults(func=cmd_query)


def _config(args: argparse.Namespace) -> ModalityConfig:
    args.setup_logging(args.log_level)
    return load_modality_config(Path(args.config) if args.config else None)


def _emit(args: argparse.Namespace, document: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        json.dump(document, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        for line in lines:
            print(line)


def _table(rows: list[dict[str, str]], columns: list[tuple[str, str]]) -> list[str]:
    widths = [max([len(title)] + [len(r.get(key, "")) for r in rows]) for key, title in columns]
    out = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True))]
    for r in rows:
        out.append(
            "  ".join(r.get(key, "").ljust(w) for (key, _), w in zip(columns, widths, strict=True))
        )
    return out


def cmd_worklist(args: argparse.Namespace) -> int:
    from datetime import datetime

    from openpacs.modality.scu import Scu
    from openpacs.modality.workflow import describe_item, worklist_items

    config = _config(args)
    keys: dict[str, Any] = {"any_date": args.all_dates}
    if args.date:
        try:
            keys["day"] = datetime.strptime(args.date, "%Y%m%d").date()
        except ValueError:
            raise ConfigError(f"--date {args.date!r} is not YYYYMMDD") from None
    if args.any_station:
        keys["station_ae"] = ""
    if args.accession:
        keys["accession"] = args.accession
    if args.patient_name:
        keys["patient_name"] = args.patient_name
    step, items = worklist_items(config, Scu(config), **keys)
    rows = [describe_item(i) for i in items]
    columns = [
        ("date", "Date"),
        ("time", "Time"),
        ("accession_number", "Accession"),
        ("patient_id", "Patient ID"),
        ("patient_name", "Patient"),
        ("procedure", "Procedure"),
        ("station_ae", "Station"),
        ("modality", "Mod"),
    ]
    lines = _table(rows, columns) if rows else ["(no worklist items)"]
    _emit(args, {"ok": step.ok, "steps": [step.to_json()], "items": rows}, lines)
    if not step.ok and not args.json:
        print(step.line(), file=sys.stderr)
    return 0 if step.ok else 1


def cmd_run(args: argparse.Namespace) -> int:
    from openpacs.modality import objects
    from openpacs.modality.workflow import RunRequest, run

    config = _config(args)
    unscheduled = None
    if args.unscheduled:
        if not args.patient_id or not args.patient_name:
            raise ConfigError("--unscheduled needs --patient-id and --patient-name")
        unscheduled = {
            "patient_id": args.patient_id,
            "patient_name": args.patient_name,
            "birth_date": args.birth_date,
            "sex": args.sex,
            "accession_number": args.unscheduled_accession,
        }
    if args.discontinue and args.discontinue not in objects.DISCONTINUATION_REASONS:
        known = ", ".join(sorted(objects.DISCONTINUATION_REASONS))
        raise ConfigError(f"--discontinue {args.discontinue!r}: one of {known}")
    if args.images < 0:
        raise ConfigError("--images must be 0 or more")
    request = RunRequest(
        accession=args.accession,
        first=args.first,
        images=args.images,
        discontinue=args.discontinue,
        print_films=args.print_films,
        unscheduled=unscheduled,
        anatomy=args.anatomy,
        received_dir=Path(args.received_dir) if args.received_dir else None,
        same_association_wait=args.commit_timeout,
        commitment_wait=args.commit_wait,
    )
    report = run(config, request)
    lines = [s.line() for s in report.steps]
    lines.append(
        ("run completed" if report.ok else "run FAILED")
        + f": study {report.procedure.get('study_instance_uid', '-')}"
    )
    _emit(args, report.to_json(), lines)
    return 0 if report.ok else 1


def _peers(config: ModalityConfig) -> list[tuple[str, Peer]]:
    peers: list[tuple[str, Peer]] = []
    if config.worklist:
        peers.append(("worklist", config.worklist))
    if config.mpps:
        peers.append(("mpps", config.mpps))
    peers += [(f"store[{n}]", p) for n, p in enumerate(config.store)]
    peers += [(f"printer[{n}]", p) for n, p in enumerate(config.printer)]
    return peers


def cmd_echo(args: argparse.Namespace) -> int:
    from openpacs.modality.scu import Scu

    config = _config(args)
    client = Scu(config)
    steps = []
    for role, peer in _peers(config):
        step = client.echo(peer)
        step.step = f"echo {role}"
        steps.append(step)
    if not steps:
        raise ConfigError("no peer configured ([worklist], [mpps], [[store]], [[printer]])")
    ok = all(s.ok for s in steps)
    _emit(args, {"ok": ok, "steps": [s.to_json() for s in steps]}, [s.line() for s in steps])
    return 0 if ok else 1


def cmd_listen(args: argparse.Namespace) -> int:
    import signal
    import threading

    from openpacs.modality.scu import Listener

    config = _config(args)
    listener = Listener(config, Path(args.received_dir))
    try:
        listener.start()
    except OSError as exc:
        print(
            f"openpacs modality: cannot listen on {config.host}:{config.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    print(
        f"listening on {config.host}:{config.port} as {config.ae_title}",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait(args.seconds)
    listener.stop()
    _emit(
        args,
        {"ok": True, "received": listener.received},
        [f"received {len(listener.received)} instance(s)"],
    )
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from pydicom import Dataset

    from openpacs.modality.scu import Scu

    config = _config(args)
    if not 0 <= args.peer < len(config.store):
        raise ConfigError(f"--peer {args.peer}: there are {len(config.store)} [[store]] peer(s)")
    peer = config.store[args.peer]
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = args.patient_name or ""
    ds.PatientID = args.patient_id or ""
    ds.AccessionNumber = args.accession or ""
    ds.StudyDate = args.study_date or ""
    for keyword in (
        "PatientBirthDate",
        "PatientSex",
        "PatientComments",
        "StudyInstanceUID",
        "StudyID",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "ModalitiesInStudy",
    ):
        setattr(ds, keyword, "")
    step, studies = Scu(config).query_studies(peer, ds)
    rows = [
        {
            "date": str(s.get("StudyDate", "") or ""),
            "accession_number": str(s.get("AccessionNumber", "") or ""),
            "patient_id": str(s.get("PatientID", "") or ""),
            "patient_name": str(s.get("PatientName", "") or ""),
            "description": str(s.get("StudyDescription", "") or ""),
            "modalities": "\\".join(s.get("ModalitiesInStudy", []) or [])
            if s.get("ModalitiesInStudy")
            else "",
            "instances": str(s.get("NumberOfStudyRelatedInstances", "") or ""),
            "study_instance_uid": str(s.get("StudyInstanceUID", "") or ""),
        }
        for s in studies
    ]
    columns = [
        ("date", "Date"),
        ("accession_number", "Accession"),
        ("patient_id", "Patient ID"),
        ("patient_name", "Patient"),
        ("description", "Description"),
        ("modalities", "Mod"),
        ("instances", "Inst"),
        ("study_instance_uid", "Study UID"),
    ]
    lines = _table(rows, columns) if rows else ["(no studies)"]
    if not step.ok:
        lines.append(step.line())
    _emit(args, {"ok": step.ok, "steps": [step.to_json()], "studies": rows}, lines)
    return 0 if step.ok else 1
