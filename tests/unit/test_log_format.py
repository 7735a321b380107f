"""The server's log line: the same text as logging's own Formatter, time included."""

from __future__ import annotations

import logging

from openpacs.cli import LOG_FORMAT, LineFormatter


def _record(created: float, msg: str) -> logging.LogRecord:
    record = logging.LogRecord("openpacs.test", logging.INFO, __file__, 1, msg, None, None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def test_lines_match_loggings_own_formatter() -> None:
    ours, reference = LineFormatter(), logging.Formatter(LOG_FORMAT)
    base = 1_764_700_000.0
    # within one second, across seconds, back in time (a clock step), far apart
    for created in (
        base + 0.001,
        base + 0.5,
        base + 0.999,
        base + 1.0,
        base + 1.25,
        base - 3600.7,
        base + 86_400 * 40 + 0.042,
        base + 0.5,
    ):
        record = _record(created, f"stored at {created}")
        assert ours.format(record) == reference.format(record)
    assert ours.format(_record(base + 2.0, "x")).endswith(" INFO openpacs.test: x")


def test_an_explicit_date_format_is_honoured() -> None:
    record = _record(1_764_700_000.25, "x")
    assert LineFormatter().formatTime(record, "%Y") == logging.Formatter().formatTime(record, "%Y")


def test_the_server_logs_through_it() -> None:
    from openpacs import cli

    root = logging.getLogger()
    names = ("pynetdicom", "pydicom", "py.warnings")
    saved = (
        root.handlers[:],
        root.level,
        [logging.getLogger(n).level for n in names],
        (logging._srcfile, logging.logThreads, logging.logProcesses),  # type: ignore[attr-defined]
        logging.logMultiprocessing,
    )
    root.handlers.clear()
    try:
        cli._setup_logging("INFO")
        assert [type(h.formatter) for h in root.handlers] == [LineFormatter]
    finally:
        logging.captureWarnings(False)
        root.handlers[:], level, levels, flags, logging.logMultiprocessing = saved
        root.setLevel(level)
        for name, lvl in zip(names, levels, strict=True):
            logging.getLogger(name).setLevel(lvl)
        logging._srcfile, logging.logThreads, logging.logProcesses = flags  # type: ignore[attr-defined]
