from __future__ import annotations

from pathlib import Path

import pytest

from openpacs.config import ConfigError, apply_overrides, load_config, parse_config

FULL = """
[dicom]
ae_title = "MYPACS"
port = 104
max_pdu = 0
max_associations = 5
require_known_calling_ae = true
artim_timeout = 2.5
[storage]
data_dir = "archive"
duplicate_policy = "keep"
drop_written_pages = false
[[remote]]
name = "viewer"
ae_title = "VIEWER"
host = "127.0.0.1"
port = 11113
[[remote]]
ae_title = "CT1"
host = "ct1.example.org"
port = 104
"""


def test_defaults() -> None:
    config = load_config(None)
    assert config.dicom.ae_title == "OPENPACS"
    assert config.dicom.port == 11112
    assert config.dicom.max_pdu == 131072
    assert config.dicom.max_associations == 32
    assert config.http.port == 8080 and config.http.host == "127.0.0.1"
    assert config.hl7.port == 2575
    assert config.storage.data_dir == Path("./openpacs-data")
    assert config.storage.duplicate_policy == "overwrite"
    assert config.dicom.worker_affinity == "auto"
    assert config.storage.drop_written_pages is True
    assert config.remotes == ()


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(FULL)
    config = load_config(path)
    assert config.dicom.ae_title == "MYPACS"
    assert config.dicom.max_pdu == 0
    assert config.dicom.require_known_calling_ae is True
    assert config.storage.data_dir == tmp_path / "archive"  # relative to the config file
    assert config.storage.duplicate_policy == "keep"
    assert config.storage.drop_written_pages is False
    assert [r.name for r in config.remotes] == ["viewer", "CT1"]
    assert config.remote_by_ae("VIEWER") is not None and config.remote_by_ae("X") is None


def test_flags_override_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(FULL)
    config = apply_overrides(
        load_config(path), ae_title="OTHER", dicom_port=5104, http_port=9090, hl7_port=3575,
        host="127.0.0.2", data_dir=tmp_path / "d",
    )  # fmt: skip
    assert (config.dicom.ae_title, config.dicom.port) == ("OTHER", 5104)
    assert (config.http.port, config.hl7.port) == (9090, 3575)
    assert config.dicom.host == config.http.host == config.hl7.host == "127.0.0.2"
    assert config.storage.data_dir == tmp_path / "d"
    assert config.dicom.max_associations == 5  # untouched values stay


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[dicom]\nmax_pdu = 100", "dicom.max_pdu"),
        ("[dicom]\nmax_pdu = 2000000", "dicom.max_pdu"),
        ("[dicom]\nport = 70000", "dicom.port"),
        ('[dicom]\nport = "104"', "dicom.port"),
        ('[dicom]\nae_title = "WAY_TOO_LONG_AE_TITLE"', "dicom.ae_title"),
        ('[dicom]\nae_title = "   "', "dicom.ae_title"),
        ('[dicom]\nae_title = "A\\\\B"', "dicom.ae_title"),
        ("[dicom]\nmax_associations = 0", "dicom.max_associations"),
        ('[dicom]\nrequire_known_calling_ae = "yes"', "dicom.require_known_calling_ae"),
        ("[dicom]\nartim_timeout = -1", "dicom.artim_timeout"),
        ('[dicom]\nae_tilte = "X"', "dicom.ae_tilte"),
        ('[storage]\nduplicate_policy = "twice"', "storage.duplicate_policy"),
        ('[storage]\ndrop_written_pages = "no"', "storage.drop_written_pages"),
        ('[dicom]\nworker_affinity = "yes"', "dicom.worker_affinity"),
        ("[dicom]\nworker_affinity = true", "dicom.worker_affinity"),
        ('[[remote]]\nae_title = "V"\nhost = "h"', "remote[0].port"),
        (
            '[[remote]]\nname="a"\nae_title="V"\nhost="h"\nport=1\n[[remote]]\nname="a"\nae_title="W"\nhost="h"\nport=2',
            "remote[1].name",
        ),
        ("[bogus]\nx = 1", "config.bogus"),
        ("[dicom\nport=1", "not valid TOML"),
    ],
)
def test_invalid_config_names_key(tmp_path: Path, text: str, names: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert names in str(info.value)


def test_invalid_flag_names_flag() -> None:
    with pytest.raises(ConfigError, match="--ae-title"):
        apply_overrides(parse_config({}), ae_title="X" * 17)
