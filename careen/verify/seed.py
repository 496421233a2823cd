"""The metadata a cloud would give the test VM, and the disk that carries it.

Each boot gets fresh values: an instance ID the image has never seen (so cloud-init must
treat the boot as a new instance), a hostname, a random password for the image's
default user, and an SSH key pair made for this boot in careen's private work
directory. They go to the guest the way clouds give them:

- NoCloud (the default): an ISO labelled `cidata` with `meta-data` and `user-data`,
  made by `cloud-localds` (cloud-image-utils);
- ConfigDrive: an ISO labelled `config-2` with `openstack/latest/meta_data.json` and
  `user_data`, as Nova writes it, made with genisoimage (or xorriso).

The password is set with cloud-config's `password:` and `chpasswd: {expire: false}`,
which apply to the default user, and `ssh_pwauth` allows it over SSH too.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml

from careen import run
from careen.errors import CareenError


class Datasource(StrEnum):
    NOCLOUD = "nocloud"
    CONFIGDRIVE = "configdrive"


@dataclass(frozen=True)
class Metadata:
    instance_id: str
    hostname: str
    user: str  # the image's default user, whose password cloud-init sets
    password: str
    public_key: str  # one OpenSSH public key line

    def redact(self, text: str) -> str:
        return run.redact(text, [self.password])


def new_metadata(user: str, public_key: str) -> Metadata:
    token = secrets.token_hex(4)
    return Metadata(
        instance_id=f"iid-careen-verify-{token}",
        hostname=f"careen-verify-{token}",
        user=user,
        password=secrets.token_urlsafe(18),
        public_key=public_key.strip(),
    )


def user_data(md: Metadata) -> str:
    config = {
        "password": md.password,
        "chpasswd": {"expire": False},
        "ssh_pwauth": True,
        "ssh_authorized_keys": [md.public_key],
    }
    return "#cloud-config\n" + yaml.safe_dump(config, default_flow_style=False, sort_keys=False)


def nocloud_meta_data(md: Metadata) -> str:
    return yaml.safe_dump(
        {"instance-id": md.instance_id, "local-hostname": md.hostname}, sort_keys=False
    )


def configdrive_meta_data(md: Metadata) -> dict[str, object]:
    """`openstack/latest/meta_data.json`, with the fields Nova writes that cloud-init reads."""
    return {
        "uuid": md.instance_id,
        "name": md.hostname,
        "hostname": md.hostname,
        "availability_zone": "nova",
        "launch_index": 0,
        "project_id": "careen-verify",
        "public_keys": {"careen-verify": md.public_key},
        "keys": [{"name": "careen-verify", "type": "ssh", "data": md.public_key}],
        "meta": {},
    }


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: str


def make_key(directory: Path) -> KeyPair:
    """A new ed25519 key pair for this boot, in careen's private work directory."""
    private = directory / "id_ed25519"
    run.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "careen-verify", "-f", private],
        hint="install it: apt-get install openssh-client",
    )
    return KeyPair(private, private.with_suffix(".pub").read_text().strip())


def make_seed(datasource: Datasource, md: Metadata, directory: Path) -> Path:
    """The metadata disk for `datasource`, as an ISO in `directory`."""
    if datasource is Datasource.NOCLOUD:
        return _nocloud(md, directory)
    return _configdrive(md, directory)


def _nocloud(md: Metadata, directory: Path) -> Path:
    user, meta = directory / "user-data", directory / "meta-data"
    _write_private(user, user_data(md))
    _write_private(meta, nocloud_meta_data(md))
    iso = directory / "seed.iso"
    run.run(
        ["cloud-localds", iso, user, meta],
        hint="install it: apt-get install cloud-image-utils (or run scripts/setup)",
    )
    return iso


def _configdrive(md: Metadata, directory: Path) -> Path:
    tree = directory / "config-drive"
    latest = tree / "openstack/latest"
    latest.mkdir(parents=True)
    _write_private(latest / "meta_data.json", json.dumps(configdrive_meta_data(md), indent=2))
    _write_private(latest / "user_data", user_data(md))
    iso = directory / "config-drive.iso"
    _make_iso(tree, iso, label="config-2")
    return iso


def _make_iso(tree: Path, iso: Path, *, label: str) -> None:
    if run.have("genisoimage"):
        argv: list[run.Arg] = ["genisoimage", "-quiet"]
    elif run.have("xorriso"):
        argv = ["xorriso", "-as", "mkisofs", "-quiet"]
    else:
        raise CareenError(
            "making a config drive needs genisoimage or xorriso",
            hint="apt-get install genisoimage (or run scripts/setup)",
        )
    run.run([*argv, "-output", iso, "-volid", label, "-joliet", "-rock", tree])


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600)
    path.write_text(text)
