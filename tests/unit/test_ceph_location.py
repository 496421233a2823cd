"""RBD locations and references: what Glance stores, and what users type."""

from __future__ import annotations

import pytest

from careen.ceph.location import RbdRef, is_ref, of_image, parse_ref, parse_url
from careen.errors import UsageError

FSID = "5b7f0f0e-0000-4000-8000-0000000000f5"


def test_a_glance_location_round_trips() -> None:
    url = f"rbd://{FSID}/images/0b5b0e5c-0000-4000-8000-000000000001/snap"
    ref = parse_url(url)
    assert ref == RbdRef("images", "0b5b0e5c-0000-4000-8000-000000000001", "snap", FSID)
    assert ref.url() == url
    assert ref.spec() == "images/0b5b0e5c-0000-4000-8000-000000000001@snap"


def test_odd_names_are_quoted() -> None:
    ref = RbdRef("my pool", "a/b", "snap", FSID)
    assert ref.url() == f"rbd://{FSID}/my%20pool/a%2Fb/snap"
    assert parse_url(ref.url()) == ref


@pytest.mark.parametrize(
    "url",
    ["rbd://onlyname", f"rbd://{FSID}/images/x", "file:///var/lib/glance/images/x", "rbd://"],
)
def test_other_locations_are_not_rbd_snapshots(url: str) -> None:
    assert parse_url(url) is None


def test_the_location_is_found_in_locations_or_direct_url() -> None:
    url = f"rbd://{FSID}/images/abc/snap"
    assert of_image({"locations": [{"url": "file:///x"}, {"url": url}]}) == parse_url(url)
    assert of_image({"direct_url": url}) == parse_url(url)
    assert of_image({"locations": [], "direct_url": "file:///x"}) is None
    assert of_image({}) is None


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("rbd:images/disk", RbdRef("images", "disk")),
        ("rbd:images/disk@snap", RbdRef("images", "disk", "snap")),
        ("rbd:vms/abc_disk@pre-upgrade", RbdRef("vms", "abc_disk", "pre-upgrade")),
    ],
)
def test_command_line_references(text: str, ref: RbdRef) -> None:
    assert is_ref(text)
    assert parse_ref(text) == ref


@pytest.mark.parametrize(
    "text", ["rbd:images", "rbd:/disk", "rbd:images/", "rbd:images/disk@", "rbd:a/b@c@d"]
)
def test_bad_references_say_how_to_write_them(text: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_ref(text)
    assert "rbd:POOL/NAME" in e.value.hint


def test_a_url_is_not_a_reference() -> None:
    assert not is_ref(f"rbd://{FSID}/images/abc/snap")
    assert not is_ref("glance:abc")
