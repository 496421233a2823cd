"""A recipe's `properties:` for the new Glance image, and what may never be set."""

from __future__ import annotations

import pytest

from careen import recipe
from careen.errors import CareenError, UsageError
from careen.glance import metadata


def test_properties_parse_and_survive_extra_steps() -> None:
    r = recipe.parse(
        "properties:\n  set: {hw_qemu_guest_agent: 'yes'}\n  unset: [site_x]\nsteps: []\n"
    )
    assert r.properties == recipe.PropertyChanges({"hw_qemu_guest_agent": "yes"}, ("site_x",))
    more = r.with_steps((recipe.Step(recipe.Op.CLEAN_CACHES),))
    assert more.properties == r.properties
    assert more.digest != recipe.parse("steps: [{clean-caches: true}]\n").digest


def test_property_set_and_unset_at_once_is_refused() -> None:
    with pytest.raises(UsageError, match="both set and unset"):
        recipe.parse("properties: {set: {a: '1'}, unset: [a]}\nsteps: []\n")


@pytest.mark.parametrize("key", ["os_hash_value", "os_glance_x", "img_signature", "instance_uuid"])
def test_reserved_keys_cannot_be_set(key: str) -> None:
    with pytest.raises(CareenError):
        metadata.check_key(key)


def test_body_follows_the_table() -> None:
    source = {
        "id": "x",
        "name": "n",
        "status": "active",
        "disk_format": "qcow2",
        "owner": "other",
        "visibility": "private",
        "min_disk": 1,
        "min_ram": 0,
        "tags": ["t"],
        "protected": True,
        "os_distro": "debian",
        "img_signature": "s",
        "image_type": "snapshot",
        "a": "b",
        "os_glance_import_task": "t",
        "size": 5,
    }
    plan = metadata.new_image_body(
        source,
        name=None,
        disk_format="raw",
        virtual_size=3 << 30,
        caller_project="mine",
        may_set_owner=False,
        changes=recipe.PropertyChanges({"c": "d"}, ("a",)),
        provenance={"careen_source_image": "x"},
    )
    assert plan.body == {
        "name": "n",
        "disk_format": "raw",
        "container_format": "bare",
        "visibility": "private",
        "min_ram": 0,
        "min_disk": 3,
        "tags": ["t"],
        "os_hidden": False,
        "os_distro": "debian",
        "c": "d",
        "careen_source_image": "x",
    }
    assert plan.protected is True
    assert any("owner" in n for n in plan.notes)
