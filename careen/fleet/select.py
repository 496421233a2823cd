"""Filters over Glance images, as operators write them.

An expression is `KEY=VALUE`, `KEY~REGEX` or `KEY<DATE`. The keys are `name`, `owner`,
`visibility`, `disk_format`, `store`, `tag`, `hidden` (yes, no or any), `created` and
`updated` (with `<`), `refitted` (yes or no: whether the plan's recipe has already
produced an image from this one) and, for any other key, an image property. For `name`
and properties VALUE is a glob (`KEY=*` asks only that the property exists) and REGEX is
searched for. Glance is asked for what it can filter exactly (owner, visibility, format,
tags, hidden, dates, a name or property without wildcards); every filter is checked
again on what comes back, so the result never depends on how Glance filtered.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from careen.errors import UsageError
from careen.glance.cloud import Cloud

EXACT_KEYS = ("owner", "visibility", "disk_format", "store", "tag")
DATE_KEYS = {"created": "created_at", "updated": "updated_at"}
SPECIAL = {"name", "hidden", "refitted", *EXACT_KEYS, *DATE_KEYS}
VISIBILITIES = ("public", "private", "shared", "community")
YES_NO = {"yes": True, "no": False, "true": True, "false": False}
GLOB_CHARS = set("*?[")
PAGE_SIZE = 100
EXPR = re.compile(r"^(?P<key>[A-Za-z0-9_:.\-]+)\s*(?P<op>=|~|<)\s*(?P<value>.*)$")
HINT = (
    "write KEY=VALUE, KEY~REGEX or created<DATE / updated<DATE (KEY: name, owner, "
    "visibility, disk_format, store, tag, hidden, refitted, or an image property)"
)


@dataclass(frozen=True)
class Filter:
    key: str
    op: str
    value: str
    text: str

    @property
    def is_property(self) -> bool:
        return self.key not in SPECIAL

    def glance_query(self) -> tuple[str, str] | None:
        """The listing parameter that filters exactly as this filter does, if there is one."""
        if self.op == "<":
            return DATE_KEYS[self.key], f"lt:{self.value}"
        if self.op != "=" or self.key in ("store", "refitted", "hidden"):
            return None
        if self.key in EXACT_KEYS:
            return self.key, self.value
        if GLOB_CHARS & set(self.value):
            return None
        return self.key, self.value

    def matches(self, image: Mapping[str, Any], refitted: bool) -> bool:
        if self.key == "hidden":
            return self.value == "any" or bool(image.get("os_hidden")) == YES_NO[self.value]
        if self.key == "refitted":
            return refitted == YES_NO[self.value]
        if self.op == "<":
            return _date(str(image.get(DATE_KEYS[self.key]) or "")) < _date(self.value)
        if self.key == "tag":
            return self.value in (image.get("tags") or [])
        if self.key == "store":
            return self.value in stores_of(image)
        if self.key not in image or image[self.key] is None:
            return False
        have = str(image[self.key])
        if self.op == "~":
            return re.search(self.value, have) is not None
        if self.key in EXACT_KEYS:
            return have == self.value
        return fnmatch.fnmatchcase(have, self.value)


def parse(text: str) -> Filter:
    m = EXPR.match(text.strip())
    if m is None:
        raise UsageError(f"cannot read the filter {text!r}", hint=HINT)
    key, op, value = m["key"], m["op"], m["value"].strip()
    if op == "<" and key not in DATE_KEYS:
        raise UsageError(f"{text!r}: only created and updated compare with <", hint=HINT)
    if key in DATE_KEYS and op != "<":
        raise UsageError(f"{text!r}: write {key}<DATE (ISO 8601)", hint=HINT)
    if op == "~" and key not in ("name",) and key in SPECIAL:
        raise UsageError(f"{text!r}: only name and properties take a regular expression", hint=HINT)
    if op == "~":
        try:
            re.compile(value)
        except re.error as e:
            raise UsageError(f"{text!r}: bad regular expression: {e}", hint=HINT) from e
    if key in DATE_KEYS:
        value = _date(value).strftime("%Y-%m-%dT%H:%M:%SZ")
    if key == "hidden" and value not in (*YES_NO, "any"):
        raise UsageError(f"{text!r}: hidden is yes, no or any", hint=HINT)
    if key == "refitted" and value not in YES_NO:
        raise UsageError(f"{text!r}: refitted is yes or no", hint=HINT)
    if key == "visibility" and value not in VISIBILITIES:
        raise UsageError(f"{text!r}: visibility is one of {', '.join(VISIBILITIES)}", hint=HINT)
    if key in ("hidden", "refitted"):
        value = "any" if value == "any" else ("yes" if YES_NO[value] else "no")
    if not value:
        raise UsageError(f"{text!r}: the value is empty", hint=HINT)
    return Filter(key, op, value, text.strip())


def _date(text: str) -> datetime:
    if not text:
        return datetime.max.replace(tzinfo=UTC)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"cannot read the date {text!r}", hint="write 2026-01-31 or 2026-01-31T12:00:00Z"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def stores_of(image: Mapping[str, Any]) -> list[str]:
    return [s for s in str(image.get("stores") or "").split(",") if s]


@dataclass
class Selection:
    where: Sequence[Filter]
    exclude: Sequence[Filter]

    def hidden_listings(self) -> list[str]:
        """The values of os_hidden to list: Glance shows one or the other, never both."""
        wanted = [f.value for f in self.where if f.key == "hidden"]
        if "any" in wanted:
            return ["false", "true"]
        if "yes" in wanted:
            return ["true"]
        return ["false"]

    def query(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        tags: list[str] = []
        for f in self.where:
            q = f.glance_query()
            if q is None:
                continue
            key, value = q
            if key == "tag":
                tags.append(value)
            elif key in params and params[key] != value:
                params[key] = _impossible(params[key], value)
            else:
                params[key] = value
        if tags:
            params["tag"] = tags
        params.setdefault("visibility", "all")
        return params

    def why(self, image: Mapping[str, Any], refitted: bool) -> list[str] | None:
        """The filters that selected `image`, or None when it is not selected."""
        if not all(f.matches(image, refitted) for f in self.where):
            return None
        if any(f.matches(image, refitted) for f in self.exclude):
            return None
        return [f.text for f in self.where if f.key != "hidden"] or ["all images"]

    def needs_refitted(self) -> bool:
        return any(f.key == "refitted" for f in (*self.where, *self.exclude))


def _impossible(a: str, b: str) -> str:
    raise UsageError(f"the filters ask for both {a!r} and {b!r}", hint="drop one of them")


def listing(
    cloud: Cloud, params: Mapping[str, Any], page_size: int = PAGE_SIZE
) -> Iterator[dict[str, Any]]:
    """Every image Glance lists for `params`, page after page."""
    marker: str | None = None
    while True:
        page = {**params, "limit": page_size, "sort": "created_at:asc,id:asc"}
        if marker:
            page["marker"] = marker
        body = cloud.get_json("/images", what="list images", params=page)
        images: list[dict[str, Any]] = body.get("images", [])
        yield from images
        if not images or "next" not in body:
            return
        marker = images[-1]["id"]


def refitted_sources(cloud: Cloud, digest: str, page_size: int = PAGE_SIZE) -> set[str]:
    """The IDs of the images that a recipe with this digest has already refitted (the
    `careen_source_image` of every image, hidden ones too, that records the digest), and
    the IDs of those refitted images themselves."""
    done: set[str] = set()
    for hidden in ("false", "true"):
        params = {"careen_recipe_digest": digest, "os_hidden": hidden, "visibility": "all"}
        for image in listing(cloud, params, page_size):
            done.add(str(image["id"]))
            if image.get("careen_source_image"):
                done.add(str(image["careen_source_image"]))
    return done


def select(
    cloud: Cloud,
    selection: Selection,
    digest: str,
    page_size: int = PAGE_SIZE,
) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """The images the selection takes, each with the filters that took it."""
    done = refitted_sources(cloud, digest, page_size) if selection.needs_refitted() else set()
    seen: set[str] = set()
    for hidden in selection.hidden_listings():
        for image in listing(cloud, {**selection.query(), "os_hidden": hidden}, page_size):
            if image["id"] in seen:
                continue
            seen.add(image["id"])
            why = selection.why(image, image["id"] in done)
            if why is not None:
                yield image, why


def parse_all(texts: Iterable[str]) -> list[Filter]:
    return [parse(t) for t in texts]
