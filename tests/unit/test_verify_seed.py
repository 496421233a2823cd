"""The metadata a verification boot hands the guest: fresh values, in both datasources' shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from careen import run
from careen.verify import seed

pytestmark = pytest.mark.timeout(30)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx0ZXN0a2V5dGVzdGtleXRlc3RrZXl0ZXN0a2V5 careen-verify"


def test_each_boot_gets_a_new_instance_hostname_and_password() -> None:
    one, two = seed.new_metadata("debian", KEY), seed.new_metadata("debian", KEY)
    assert one.instance_id != two.instance_id
    assert one.hostname != two.hostname
    assert one.password != two.password
    assert len(one.password) >= 20
    assert one.instance_id.startswith("iid-careen-verify-")
    # A hostname the login prompt can show as it is: no dots, no upper case.
    assert one.hostname == one.hostname.lower() and "." not in one.hostname


def test_user_data_sets_the_default_users_password_and_key() -> None:
    md = seed.new_metadata("debian", KEY)
    text = seed.user_data(md)
    assert text.startswith("#cloud-config\n")
    config = yaml.safe_load(text)
    assert config == {
        "password": md.password,
        "chpasswd": {"expire": False},
        "ssh_pwauth": True,
        "ssh_authorized_keys": [KEY],
    }


def test_nocloud_meta_data_names_the_instance_and_hostname() -> None:
    md = seed.new_metadata("debian", KEY)
    assert yaml.safe_load(seed.nocloud_meta_data(md)) == {
        "instance-id": md.instance_id,
        "local-hostname": md.hostname,
    }


def test_config_drive_meta_data_is_what_nova_writes() -> None:
    md = seed.new_metadata("debian", KEY)
    data = seed.configdrive_meta_data(md)
    assert data["uuid"] == md.instance_id
    assert data["hostname"] == md.hostname
    assert data["public_keys"] == {"careen-verify": KEY}
    json.dumps(data)  # serialisable as it stands


def test_password_is_redacted() -> None:
    md = seed.new_metadata("debian", KEY)
    assert md.password not in md.redact(f"typed {md.password} here")


def test_seed_isos_are_made_with_the_expected_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def record(argv: Any, *args: Any, **kwargs: Any) -> None:
        calls.append([str(a) for a in argv])

    monkeypatch.setattr(run, "run", record)
    monkeypatch.setattr(run, "have", lambda program: program == "genisoimage")
    md = seed.new_metadata("debian", KEY)
    nocloud = seed.make_seed(seed.Datasource.NOCLOUD, md, tmp_path)
    assert calls[-1] == [
        "cloud-localds",
        str(nocloud),
        str(tmp_path / "user-data"),
        str(tmp_path / "meta-data"),
    ]
    assert (tmp_path / "user-data").stat().st_mode & 0o077 == 0  # the password is private
    drive = seed.make_seed(seed.Datasource.CONFIGDRIVE, md, tmp_path)
    argv = calls[-1]
    assert argv[0] == "genisoimage" and argv[argv.index("-volid") + 1] == "config-2"
    assert argv[argv.index("-output") + 1] == str(drive)
    latest = tmp_path / "config-drive/openstack/latest"
    assert json.loads((latest / "meta_data.json").read_text())["uuid"] == md.instance_id
    assert yaml.safe_load((latest / "user_data").read_text())["password"] == md.password


def test_config_drive_without_an_iso_tool_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "have", lambda program: False)
    md = seed.new_metadata("debian", KEY)
    with pytest.raises(Exception, match="genisoimage or xorriso"):
        seed.make_seed(seed.Datasource.CONFIGDRIVE, md, tmp_path)
