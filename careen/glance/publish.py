"""Publish a refitted file as a new Glance image, and retire the old one when asked.

The new image gets an ID chosen here, journaled before it is created, so that a run
killed at any point leaves a record `careen cleanup` can delete it by. Until the data is
uploaded, Glance's hashes are checked against the local file and the members are
re-added, the image carries `careen_run`; it is protected (when the source was) only at
the very end, because a protected image cannot be deleted by a rollback. Nothing about
the old image changes before all of that succeeded.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from careen import journal
from careen.errors import CareenError, ExitCode
from careen.glance.cloud import JSON_PATCH, OCTET, Cloud, GlanceError
from careen.glance.metadata import RUN_KEY
from careen.glance.source import Progress, SourceImage
from careen.interrupts import critical
from careen.log import step

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ACTIVE_TIMEOUT = 600.0
JOURNAL_KIND = "glance-image"
# What makes an image holding a derived ID the same work: its source and recipe.
PROVENANCE_MATCH = ("careen_source_image", "careen_recipe_digest")


class Retire(StrEnum):
    KEEP = "keep"
    RENAME = "rename"
    HIDE = "hide"
    DEACTIVATE = "deactivate"
    DELETE = "delete"


@dataclass
class Published:
    id: str
    name: str
    disk_format: str
    hash_algo: str
    hash_value: str
    notes: list[str] = field(default_factory=list)
    pending_members: list[str] = field(default_factory=list)


def patch(cloud: Cloud, image_id: str, ops: list[dict[str, Any]], what: str) -> dict[str, Any]:
    response = cloud.request(
        "PATCH",
        f"/images/{image_id}",
        what=what,
        json=ops,
        headers={"Content-Type": JSON_PATCH},
    )
    body: dict[str, Any] = response.json()
    return body


@dataclass
class NewImage:
    id: str
    kept: bool = False

    def keep(self) -> None:
        """The image is published: leaving the context no longer deletes it."""
        self.kept = True


class IdTaken(CareenError):
    """The ID asked for the new image is already an image's (or was, and was deleted)."""

    def __init__(self, message: str, hint: str, image: dict[str, Any] | None) -> None:
        super().__init__(message, hint, ExitCode.ID_TAKEN)
        self.image = image


LEFTOVER_STATES = ("queued", "saving", "importing", "uploading")


@contextmanager
def queued_image(cloud: Cloud, body: dict[str, Any]) -> Iterator[NewImage]:
    """Create the new image, and delete it again on the way out unless it was kept.

    Its ID is `body["id"]` when given (a fleet derives it, so that two runs of one attempt
    collide in Glance instead of publishing twice), else a new random one."""
    given = body.get("id")
    new = NewImage(str(given or uuid.uuid4()))
    with critical():  # journaled and created before Ctrl-C can strike
        handle = journal.record(
            JOURNAL_KIND, image_id=new.id, cloud=cloud.name, what="new Glance image"
        )
        try:
            _create(cloud, {**body, "id": new.id}, derived=given is not None)
        except GlanceError as e:
            handle.done()
            if e.status == 413:
                raise CareenError(
                    e.message, hint="unset properties in the recipe (properties: {unset: [...]})"
                ) from e
            raise
        except BaseException:
            handle.done()
            raise
    try:
        yield new
    finally:
        if not new.kept:
            _delete_quietly(cloud, new.id)
        handle.done()


def _create(cloud: Cloud, body: dict[str, Any], *, derived: bool) -> None:
    """POST the new image. When the ID asked for is taken, nothing is created: an
    unfinished image of the same source and recipe there is an earlier run's leftover
    and is deleted (Glance never gives a deleted ID out again, so the work needs a new
    attempt either way); any other holder is reported and left alone."""
    image_id = body["id"]
    try:
        cloud.request("POST", "/images", what="create the new image", json=body)
        return
    except GlanceError as e:
        if e.status != 409 or not derived:
            raise
    found = cloud.request(
        "GET", f"/images/{image_id}", ok=(200, 404), what="look at the image holding the ID"
    )
    holder: dict[str, Any] | None = found.json() if found.status_code == 200 else None
    again = "run the work again under a new attempt (careen fleet run does)"
    if holder is None:
        raise IdTaken(
            f"the image ID {image_id} was used before (Glance never gives a deleted image's "
            "ID out again)",
            hint=again,
            image=None,
        )
    same = all(holder.get(k) == body.get(k) for k in PROVENANCE_MATCH)
    if same and holder.get("status") in LEFTOVER_STATES:
        log.warning(
            "Image %s is an unfinished leftover of an earlier run (%s): deleting it",
            image_id,
            holder.get("status"),
        )
        _delete_quietly(cloud, image_id)
        raise IdTaken(
            f"the image ID {image_id} held an unfinished leftover of an earlier run of the "
            "same work; it was deleted, and the ID cannot be used again",
            hint=again,
            image=holder,
        )
    raise IdTaken(
        f"the image ID {image_id} is already taken by image {holder.get('name')!r} "
        f"({holder.get('status')})",
        hint="it was published by an earlier run of the same work"
        if same and holder.get("status") == "active"
        else "look at that image; careen leaves it alone",
        image=holder,
    )


def _delete_quietly(cloud: Cloud, image_id: str) -> None:
    with critical():
        try:
            cloud.request("DELETE", f"/images/{image_id}", ok=(204, 404), what="roll back")
            log.info("Deleted the unfinished new image %s", image_id)
        except CareenError as e:
            log.error(
                "could not delete the unfinished image %s: %s (careen cleanup retries)", image_id, e
            )
            raise


def _chunks(path: Path, hashers: list[Any], progress: Progress | None) -> Iterator[bytes]:
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashers:
                h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done)
            yield chunk


def import_methods(cloud: Cloud) -> list[str]:
    info = cloud.get_json("/info/import", what="ask which import methods the cloud offers")
    return [str(m) for m in info.get("import-methods", {}).get("value", [])]


def check_store(cloud: Cloud, store: str) -> None:
    listing = cloud.get_json("/info/stores", what="list the cloud's stores")
    names = [str(s.get("id")) for s in listing.get("stores", [])]
    if store not in names:
        raise CareenError(
            f"the cloud has no store {store!r}",
            hint=f"stores: {', '.join(names) or 'none (not a multi-store cloud)'}",
        )


def upload(
    cloud: Cloud,
    image_id: str,
    path: Path,
    *,
    use_import: bool,
    store: str | None,
    progress: Progress | None = None,
) -> dict[str, str]:
    """Send the data; return the local file's digests (sha512 and md5)."""
    digests = {"sha512": hashlib.sha512(), "md5": hashlib.md5(usedforsecurity=False)}
    data = _chunks(path, list(digests.values()), progress)
    headers = {"Content-Type": OCTET}
    if use_import:
        with _refusal_explained(cloud, image_id):
            cloud.request(
                "PUT",
                f"/images/{image_id}/stage",
                what="stage the data",
                data=data,
                headers=headers,
            )
        body: dict[str, Any] = {"method": {"name": "glance-direct"}}
        if store:
            body["stores"] = [store]
        cloud.request(
            "POST",
            f"/images/{image_id}/import",
            ok=(202,),
            what="import the staged data",
            json=body,
        )
    else:
        if store:
            headers["X-Image-Meta-Store"] = store
        with _refusal_explained(cloud, image_id):
            cloud.request(
                "PUT",
                f"/images/{image_id}/file",
                what="upload the data",
                data=data,
                headers=headers,
            )
    return {algo: h.hexdigest() for algo, h in digests.items()}


@contextmanager
def _refusal_explained(cloud: Cloud, image_id: str) -> Iterator[None]:
    """A Glance that refuses the data part-way (a size cap, a storage quota) may close the
    connection before its answer can be read: say so, with what Glance made of the image."""
    try:
        yield
    except GlanceError:
        raise
    except CareenError as e:
        found = cloud.request(
            "GET", f"/images/{image_id}", ok=(200, 404), what="look at the new image"
        )
        status = found.json().get("status") if found.status_code == 200 else "gone"
        raise CareenError(
            f"the connection broke while sending the data ({e.message}); Glance left the new "
            f"image {status}",
            hint="Glance may have refused the data part-way: an image size cap "
            "(image_size_cap) or a storage quota; see the cloud's limits and Glance's log",
        ) from e


def wait_active(cloud: Cloud, image_id: str, timeout: float = ACTIVE_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        image = cloud.get_json(f"/images/{image_id}", what="check the new image")
        status = image.get("status")
        if status == "active":
            return image
        failed = image.get("os_glance_failed_import")
        if status in ("killed", "deleted") or failed:
            raise CareenError(
                f"Glance did not accept the data of the new image {image_id} "
                f"(status {status}{', import failed in ' + failed if failed else ''})",
                hint="see Glance's log; nothing was published",
            )
        if time.monotonic() > deadline:
            raise CareenError(
                f"the new image {image_id} is still {status} after {timeout:.0f} s",
                hint="the cloud is slow or stuck; nothing was published",
            )
        time.sleep(0.5)


def check_hashes(
    image: dict[str, Any], path: Path | None, local: dict[str, str]
) -> tuple[str, str]:
    """Glance's hashes of the new image must be the local file's (or data's: `local`)."""
    algo = str(image.get("os_hash_algo") or "")
    value = str(image.get("os_hash_value") or "")
    if algo and algo not in local and path is not None:
        h = hashlib.new(algo)
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        local[algo] = h.hexdigest()
    mismatch = []
    if algo and local.get(algo) != value:
        mismatch.append(algo)
    if image.get("checksum") and image["checksum"] != local["md5"]:
        mismatch.append("md5")
    if not algo and not image.get("checksum"):
        mismatch.append("no hash at all")
    if mismatch:
        raise CareenError(
            f"Glance's {', '.join(mismatch)} of the new image {image['id']} differs from the "
            "file careen uploaded",
            hint="the data was damaged on the way, or Glance hashed other data; nothing was "
            "published, try again",
        )
    return (algo, value) if algo else ("md5", local["md5"])


def add_location(
    cloud: Cloud, image_id: str, url: str, store: str | None, validation: dict[str, str]
) -> str:
    """Give the queued image its data by location; return which API took it.

    The locations API (`POST /v2/images/ID/locations`) is tried first; it wants the
    service role for URLs that are not http. Otherwise the older PATCH of `locations`,
    which computes no hashes: `validation` (checksum, os_hash_algo, os_hash_value,
    computed by careen while it read the data) goes with it."""
    try:
        cloud.request(
            "POST",
            f"/images/{image_id}/locations",
            ok=(202,),
            what="register the new image's location",
            # This API takes the os_hash pair only; the older one takes checksum as well.
            json={
                "url": url,
                "validation_data": {k: v for k, v in validation.items() if k != "checksum"},
            },
        )
        return "the locations API (POST /v2/images/ID/locations)"
    except GlanceError as e:
        if e.status not in (403, 404, 405):
            raise
        log.debug("the locations API refused (%s); using the PATCH of locations", e.status)
    value: dict[str, Any] = {
        "url": url,
        "metadata": {"store": store} if store else {},
        "validation_data": validation,
    }
    patch(
        cloud,
        image_id,
        [{"op": "add", "path": "/locations/-", "value": value}],
        "register the new image's location",
    )
    return "the PATCH of locations (with careen's hashes as validation data)"


def finish(
    cloud: Cloud, image_id: str, *, protected: bool, members: list[str]
) -> tuple[list[str], list[str]]:
    """Re-add members, drop the run key, protect: the last steps before the image counts."""
    notes: list[str] = []
    pending = []
    for member in members:
        try:
            cloud.request(
                "POST",
                f"/images/{image_id}/members",
                what=f"add member {member}",
                json={"member": member},
            )
            pending.append(member)
        except GlanceError as e:
            notes.append(f"member {member} could not be re-added: {e.message}")
    ops: list[dict[str, Any]] = [{"op": "remove", "path": f"/{RUN_KEY}"}]
    if protected:
        ops.append({"op": "replace", "path": "/protected", "value": True})
    patch(cloud, image_id, ops, "finish the new image")
    return notes, pending


def members_of(cloud: Cloud, src: SourceImage) -> list[str]:
    if src.image.get("visibility") != "shared":
        return []
    try:
        listing = cloud.get_json(f"/images/{src.id}/members", what="list the source's members")
    except GlanceError as e:
        if e.status in (403, 404):
            log.warning("cannot list the members of %s (%s); none re-added", src.id, e.status)
            return []
        raise
    return [str(m["member_id"]) for m in listing.get("members", [])]


# --- retiring the old image ------------------------------------------------------------


def retire(cloud: Cloud, src: SourceImage, how: Retire, suffix: str) -> str | None:
    """Retire the old image as asked; return what was done, for the output."""
    label = src.label()
    if how is Retire.KEEP:
        return None
    with step(f"Retiring the old image {label}: {how}"):
        if how is Retire.RENAME:
            new = f"{src.name}{suffix}"
            set_field(cloud, src.id, "name", new, "rename the old image")
            return f"old image {src.id} renamed to {new!r}"
        if how is Retire.HIDE:
            set_field(cloud, src.id, "os_hidden", True, "hide the old image")
            return f"old image {src.id} hidden (os_hidden)"
        warn = "servers booted from the old image can no longer be rebuilt or evacuated from it"
        if how is Retire.DEACTIVATE:
            cloud.request(
                "POST", f"/images/{src.id}/actions/deactivate", what="deactivate the old image"
            )
            log.warning("old image %s deactivated: %s", label, warn)
            return f"old image {src.id} deactivated ({warn})"
        if src.image.get("protected"):
            raise CareenError(
                f"the old image {label} is protected and was not deleted; the new image is "
                "published",
                hint="unprotect it (openstack image set --unprotected) and delete it yourself",
            )
        cloud.request("DELETE", f"/images/{src.id}", what="delete the old image")
        log.warning("old image %s deleted: %s", label, warn)
        return f"old image {src.id} deleted ({warn})"


def take_name(cloud: Cloud, image_id: str, name: str) -> None:
    set_field(cloud, image_id, "name", name, "give the new image the old name")


def set_field(cloud: Cloud, image_id: str, name: str, value: Any, what: str) -> None:
    patch(cloud, image_id, [{"op": "replace", "path": f"/{name}", "value": value}], what)


# --- careen cleanup --------------------------------------------------------------------


def release_journaled(entry: dict[str, Any], same_boot: bool) -> str | None:
    """Delete a new image a dead run left behind (it never finished publishing)."""
    from careen.glance.cloud import connect

    image_id = str(entry.get("image_id", ""))
    cloud = connect(entry.get("cloud"))
    try:
        response = cloud.request(
            "DELETE", f"/images/{image_id}", ok=(204, 404), what="delete an unfinished image"
        )
    finally:
        cloud.close()
    if response.status_code == 404:
        return None
    return f"deleted the unfinished Glance image {image_id}"
