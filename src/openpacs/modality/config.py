"""Configuration of the virtual modality (`openpacs modality … --config FILE`): one TOML file.

Owns: the ``[modality]``, ``[worklist]``, ``[mpps]``, ``[[store]]`` and ``[[printer]]`` sections
(names and keys are public interface, as in the issue that defines the tool), their defaults —
the timers of seed 004 T3-66 — and validation with messages naming the key.
Must not: open sockets or build DICOM objects.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpacs.config import (
    ConfigError,
    _bool,
    _check_keys,
    _host,
    _port,
    _positive_number,
    _str,
    validate_ae_title,
)

MODALITIES = ("DX", "CR")


@dataclass(frozen=True)
class Peer:
    """A remote application entity the modality talks to."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class StorePeer(Peer):
    """A storage destination; *commit*: ask it for Storage Commitment after sending."""

    commit: bool = False


@dataclass(frozen=True)
class ModalityConfig:
    ae_title: str = "MOD1"
    host: str = "0.0.0.0"  # where the listener binds (commitment reports, C-ECHO, C-STORE)
    port: int = 11113
    station_name: str = "DXROOM1"
    modality: str = "DX"
    institution_name: str = "openpacs Virtual Hospital"
    institution_department: str = "Radiology"
    manufacturer: str = "openpacs"
    model_name: str = "MULTIX Impact C (virtual)"
    device_serial_number: str = "VM-0001"
    character_set: str = "ISO_IR 192"  # of the objects the modality creates
    # Seed 004 T3-66: how long to wait for the commitment report on the same association,
    # before releasing it and waiting for a new association from the SCP.
    commitment_timeout: float = 120.0
    commitment_wait: float = 600.0  # the whole wait for the report (same + new association)
    network_timeout: float = 30.0  # DIMSE / network timeout of every association
    acse_timeout: float = 30.0
    worklist: Peer | None = None
    mpps: Peer | None = None
    store: tuple[StorePeer, ...] = ()
    printer: tuple[Peer, ...] = ()


MODALITY_KEYS = {
    "ae_title",
    "host",
    "port",
    "station_name",
    "modality",
    "institution_name",
    "institution_department",
    "manufacturer",
    "model_name",
    "device_serial_number",
    "character_set",
    "commitment_timeout",
    "commitment_wait",
    "network_timeout",
    "acse_timeout",
}


def _peer(raw: object, where: str, allowed: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table with ae_title, host and port")
    _check_keys(raw, allowed or {"ae_title", "host", "port"}, where)
    for key in ("ae_title", "host", "port"):
        if key not in raw:
            raise ConfigError(f"{where}.{key}: missing")
    return {
        "ae_title": validate_ae_title(raw["ae_title"], f"{where}.ae_title"),
        "host": _host(raw["host"], f"{where}.host"),
        "port": _port(raw["port"], f"{where}.port"),
    }


def parse_modality_config(raw: dict[str, Any]) -> ModalityConfig:
    _check_keys(raw, {"modality", "worklist", "mpps", "store", "printer"}, "config")
    section = raw.get("modality", {})
    if not isinstance(section, dict):
        raise ConfigError("modality: must be a table")
    _check_keys(section, MODALITY_KEYS, "modality")
    defaults = ModalityConfig()
    values: dict[str, Any] = {}
    if "ae_title" in section:
        values["ae_title"] = validate_ae_title(section["ae_title"], "modality.ae_title")
    if "host" in section:
        values["host"] = _host(section["host"], "modality.host")
    if "port" in section:
        values["port"] = _port(section["port"], "modality.port")
    for key in (
        "station_name",
        "institution_name",
        "institution_department",
        "manufacturer",
        "model_name",
        "device_serial_number",
        "character_set",
    ):
        if key in section:
            values[key] = _str(section[key], f"modality.{key}")
    if "station_name" in values and len(values["station_name"]) > 16:
        raise ConfigError("modality.station_name: at most 16 characters (SH)")
    if "modality" in section:
        modality = _str(section["modality"], "modality.modality").upper()
        if modality not in MODALITIES:
            raise ConfigError(f"modality.modality: {modality!r} is not one of DX, CR")
        values["modality"] = modality
    if values.get("character_set", defaults.character_set) not in ("ISO_IR 100", "ISO_IR 192"):
        raise ConfigError("modality.character_set: ISO_IR 100 or ISO_IR 192")
    for key in ("commitment_timeout", "commitment_wait", "network_timeout", "acse_timeout"):
        if key in section:
            values[key] = _positive_number(section[key], f"modality.{key}")
    for name in ("worklist", "mpps"):
        if name in raw:
            values[name] = Peer(**_peer(raw[name], name))
    stores = raw.get("store", [])
    if not isinstance(stores, list):
        raise ConfigError("store: must be an array of tables ([[store]])")
    values["store"] = tuple(
        StorePeer(
            **_peer(s, f"store[{n}]", {"ae_title", "host", "port", "commit"}),
            commit=_bool(s.get("commit", False), f"store[{n}].commit"),
        )
        for n, s in enumerate(stores)
    )
    printers = raw.get("printer", [])
    if not isinstance(printers, list):
        raise ConfigError("printer: must be an array of tables ([[printer]])")
    values["printer"] = tuple(Peer(**_peer(p, f"printer[{n}]")) for n, p in enumerate(printers))
    return ModalityConfig(**values)


def load_modality_config(path: Path | None) -> ModalityConfig:
    if path is None:
        return ModalityConfig()
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_modality_config(raw)
