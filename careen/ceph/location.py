"""Where an RBD-backed Glance image keeps its data: `rbd://FSID/POOL/IMAGE/SNAP`.

Glance's rbd store writes the image into its pool under the image ID, with a protected
snapshot named `snap` that Nova and Cinder clone from, and records that URL as the
image's location (shown as `locations` or `direct_url` when the cloud is configured to
show them). A source given on its own is written `rbd:POOL/NAME[@SNAP]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from careen.errors import UsageError

SNAP = "snap"  # the snapshot name Glance and Nova use
PREFIX = "rbd:"
_NAME = re.compile(r"[^/@\s]+")


@dataclass(frozen=True)
class RbdRef:
    pool: str
    image: str
    snap: str | None = None
    fsid: str | None = None  # known when it came from a Glance location

    def url(self) -> str:
        """The location URL Glance stores (needs the fsid and the snapshot)."""
        assert self.fsid and self.snap, self
        parts = (self.fsid, self.pool, self.image, self.snap)
        return "rbd://" + "/".join(quote(p, safe="") for p in parts)

    def spec(self) -> str:
        return f"{self.pool}/{self.image}" + (f"@{self.snap}" if self.snap else "")


def parse_url(url: str) -> RbdRef | None:
    """An `rbd://FSID/POOL/IMAGE/SNAP` location, or None."""
    if not url.startswith("rbd://"):
        return None
    parts = [unquote(p) for p in url[len("rbd://") :].split("/")]
    if len(parts) == 4 and all(parts):
        return RbdRef(pool=parts[1], image=parts[2], snap=parts[3], fsid=parts[0])
    return None  # the oldest form names the image only: the pool is unknown


def is_ref(text: str) -> bool:
    return text.startswith(PREFIX) and not text.startswith("rbd://")


def parse_ref(text: str) -> RbdRef:
    """`rbd:POOL/NAME[@SNAP]`, as given on the command line."""
    body = text[len(PREFIX) :]
    pool, _, rest = body.partition("/")
    name, _, snap = rest.partition("@")
    if not (_NAME.fullmatch(pool) and _NAME.fullmatch(name)) or (rest.count("@") > 1):
        raise UsageError(
            f"{text!r} is not an RBD image reference",
            hint="write rbd:POOL/NAME or rbd:POOL/NAME@SNAP",
        )
    if "@" in rest and not _NAME.fullmatch(snap):
        raise UsageError(f"{text!r} names an empty snapshot", hint="write rbd:POOL/NAME@SNAP")
    return RbdRef(pool=pool, image=name, snap=snap or None)


def of_image(image: dict[str, Any]) -> RbdRef | None:
    """The RBD location of a Glance image, when the cloud shows it."""
    urls = [str(loc.get("url", "")) for loc in image.get("locations") or []]
    if image.get("direct_url"):
        urls.append(str(image["direct_url"]))
    for url in urls:
        ref = parse_url(url)
        if ref is not None:
            return ref
    return None
