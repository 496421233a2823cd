"""What a new image inherits from the one it was refitted from (the table in pitfalls.md).

`new_image_body()` turns the source image, as the API shows it, into the body of
`POST /v2/images`: base fields the caller may set, every property except those Glance
sets, reserves or that would be wrong on new data, the recipe's property changes, and
careen's provenance keys. It also says what it could not carry over, for the output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from careen.errors import CareenError
from careen.recipe import PropertyChanges

# Fields Glance sets itself, or that describe the old data.
GLANCE_SETS = frozenset(
    {
        "id",
        "status",
        "checksum",
        "os_hash_algo",
        "os_hash_value",
        "size",
        "virtual_size",
        "locations",
        "direct_url",
        "stores",
        "file",
        "schema",
        "self",
        "created_at",
        "updated_at",
    }
)
# Left for the code that decides them (or, for owner and protected, applies them later).
DECIDED = frozenset(
    {"name", "disk_format", "container_format", "visibility", "owner", "protected", "min_disk"}
)
# Snapshot bookkeeping: true of the server a snapshot came from, not of the new image.
SNAPSHOT = frozenset(
    {
        "image_type",
        "instance_uuid",
        "base_image_ref",
        "image_location",
        "image_state",
        "user_id",
        "owner_id",
        "owner_project_name",
        "owner_user_name",
        "boot_roles",
        "bdm_v2",
        "block_device_mapping",
        "root_device_name",
    }
)
PROVENANCE = (
    "careen_source_image",
    "careen_recipe",
    "careen_recipe_digest",
    "careen_version",
    "careen_refitted_at",
)
RUN_KEY = "careen_run"  # only while the run lasts
DEFAULT_PROPERTY_QUOTA = 128  # Glance's image_property_quota default
# Base fields of the schema that are not properties (do not count against the quota).
BASE_FIELDS = GLANCE_SETS | DECIDED | {"tags", "min_ram", "os_hidden", "member"}


def is_encrypted(image: Mapping[str, Any]) -> bool:
    return any(k.startswith("cinder_encryption_key_") for k in image)


def dropped(key: str) -> str | None:
    """Why a source field is not copied, or None when it is."""
    if key in GLANCE_SETS:
        return "set by Glance"
    if key.startswith("os_glance_"):
        return "reserved by Glance"
    if key.startswith("img_signature"):
        return "the signature does not match the new data"
    if key in SNAPSHOT:
        return "snapshot bookkeeping"
    if key.startswith("careen_"):
        return "replaced by this run's provenance"
    return None


@dataclass
class Plan:
    body: dict[str, Any]
    protected: bool  # applied once the image is active, so a rollback can delete it
    notes: list[str]


_KEY = re.compile(r"[A-Za-z0-9_:.\-]{1,255}")


def check_key(key: str) -> None:
    if not _KEY.fullmatch(key) or key in BASE_FIELDS or dropped(key) is not None:
        raise CareenError(
            f"the image property {key!r} cannot be set by a recipe",
            hint="recipes set ordinary properties (hw_*, os_distro, site keys)",
        )


def new_image_body(
    source: Mapping[str, Any],
    *,
    name: str | None,
    disk_format: str,
    virtual_size: int | None,
    caller_project: str,
    may_set_owner: bool,
    changes: PropertyChanges,
    provenance: Mapping[str, str],
    property_quota: int = DEFAULT_PROPERTY_QUOTA,
) -> Plan:
    notes: list[str] = []
    body: dict[str, Any] = {
        "name": name or source.get("name") or "",
        "disk_format": disk_format,
        "container_format": source.get("container_format") or "bare",
        "visibility": source.get("visibility") or "shared",
        "min_ram": int(source.get("min_ram") or 0),
        "min_disk": _min_disk(source, virtual_size, notes),
        "tags": list(source.get("tags") or []),
        "os_hidden": bool(source.get("os_hidden", False)),
    }
    owner = source.get("owner")
    if owner and owner != caller_project:
        if may_set_owner:
            body["owner"] = owner
        else:
            notes.append(
                f"owner: the new image belongs to your project {caller_project}, not to "
                f"{owner} (only an admin may give it another owner)"
            )
    skipped: dict[str, list[str]] = {}
    for key, value in source.items():
        if key in BASE_FIELDS:
            continue
        why = dropped(key)
        if why:
            skipped.setdefault(why, []).append(key)
            continue
        body[key] = value
    for key in changes.unset:
        body.pop(key, None)
    for key, value in changes.set.items():
        body[key] = value
    body.update(provenance)
    for why, keys in skipped.items():
        if why != "set by Glance":
            notes.append(f"not copied ({why}): {', '.join(sorted(keys))}")
    count = sum(1 for k in body if k not in BASE_FIELDS) + 1  # + the run key
    if count > property_quota:
        raise CareenError(
            f"the new image would have {count} properties; Glance allows {property_quota}",
            hint="unset some in the recipe (properties: {unset: [...]})",
        )
    return Plan(body, bool(source.get("protected")), notes)


def _min_disk(source: Mapping[str, Any], virtual_size: int | None, notes: list[str]) -> int:
    min_disk = int(source.get("min_disk") or 0)
    if virtual_size:
        needed = -(-virtual_size // (1 << 30))  # GiB, rounded up
        if 0 < min_disk < needed:  # 0 means unset: nothing to keep true
            notes.append(f"min_disk raised from {min_disk} to {needed} GiB (the virtual size)")
            return needed
    return min_disk
