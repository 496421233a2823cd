"""`careen fleet plan`: which images a fleet run will refit, saved to a plan file.

The plan file is JSON: the fleet's ID (from which every new image's ID is derived), the
cloud, the recipe (reference, name and digest), the options every image is refitted
with, the filters, and one entry per image (ID, name, size, format, stores, owner,
visibility, queue, `updated_at`, checksum, and the filters that took it). `fleet run`
skips an image whose `updated_at` or checksum changed since. Planning changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from careen.errors import CareenError, UsageError
from careen.fleet import select
from careen.glance.cloud import Cloud

log = logging.getLogger(__name__)

PLAN_VERSION = 1
DEFAULT_QUEUE = "careen"
MiB = 1 << 20


@dataclass
class Entry:
    id: str
    name: str
    size: int
    virtual_size: int | None
    disk_format: str
    status: str
    stores: list[str]
    owner: str
    visibility: str
    hidden: bool
    queue: str
    updated_at: str
    checksum: str
    why: list[str]


@dataclass
class Plan:
    fleet_id: str
    cloud: str | None
    recipe: dict[str, str]  # ref, name, digest
    refit_args: list[str]  # given to every `careen refit` of the fleet
    where: list[str]
    exclude: list[str]
    images: list[Entry]
    created_at: str = ""
    warnings: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION

    def entry(self, image_id: str) -> Entry:
        for e in self.images:
            if e.id == image_id:
                return e
        raise KeyError(image_id)


def checksum_of(image: Mapping[str, Any]) -> str:
    if image.get("os_hash_value"):
        return f"{image.get('os_hash_algo')}:{image['os_hash_value']}"
    return f"md5:{image['checksum']}" if image.get("checksum") else ""


def queue_for(image: Mapping[str, Any], routes: Mapping[str, str], default: str) -> str:
    for store in select.stores_of(image):
        if store in routes:
            return routes[store]
    return default


def parse_routes(texts: Sequence[str]) -> dict[str, str]:
    routes = {}
    for text in texts:
        store, sep, queue = text.partition("=")
        if not sep or not store or not queue:
            raise UsageError(f"cannot read the route {text!r}", hint="write --route STORE=QUEUE")
        routes[store] = queue
    return routes


def make_plan(
    cloud: Cloud,
    selection: select.Selection,
    recipe: dict[str, str],
    refit_args: list[str],
    routes: Mapping[str, str],
    default_queue: str = DEFAULT_QUEUE,
    page_size: int = select.PAGE_SIZE,
) -> Plan:
    images = []
    for image, why in select.select(cloud, selection, recipe["digest"], page_size):
        images.append(
            Entry(
                id=str(image["id"]),
                name=str(image.get("name") or ""),
                size=int(image.get("size") or 0),
                virtual_size=image.get("virtual_size"),
                disk_format=str(image.get("disk_format") or ""),
                status=str(image.get("status")),
                stores=select.stores_of(image),
                owner=str(image.get("owner") or ""),
                visibility=str(image.get("visibility")),
                hidden=bool(image.get("os_hidden")),
                queue=queue_for(image, routes, default_queue),
                updated_at=str(image.get("updated_at")),
                checksum=checksum_of(image),
                why=why,
            )
        )
    plan = Plan(
        fleet_id=str(uuid.uuid4()),
        cloud=cloud.name,
        recipe=recipe,
        refit_args=refit_args,
        where=[f.text for f in selection.where],
        exclude=[f.text for f in selection.exclude],
        images=images,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    plan.warnings += check_quota(cloud, plan)
    return plan


def check_quota(cloud: Cloud, plan: Plan) -> list[str]:
    """What the cloud's image quota (unified limits, /v2/info/usage) leaves for the run:
    one new image per entry, each the size of its source."""
    found = cloud.request("GET", "/info/usage", ok=(200, 404), what="read the image quota")
    if found.status_code == 404:
        return ["the cloud does not report image quota usage; the quota was not checked"]
    usage: dict[str, Any] = found.json().get("usage", {})
    if not usage:
        return ["the cloud enforces no image quota through Keystone (unified limits are off)"]
    need = {
        "image_count_total": len(plan.images),
        "image_size_total": sum(e.size for e in plan.images) // MiB,
        "image_count_uploading": 0,
    }
    warnings = []
    for key, amount in need.items():
        limit = usage.get(key, {}).get("limit", -1)
        used = usage.get(key, {}).get("usage", 0)
        if limit is None or limit < 0 or amount == 0:
            continue
        if used + amount > limit:
            unit = " MiB" if key == "image_size_total" else ""
            warnings.append(
                f"quota {key}: {limit - used}{unit} left, the fleet needs {amount}{unit} "
                "(images that do not fit will fail)"
            )
    return warnings


def check_pools(plan: Plan, access: Any, pools: Mapping[str, str]) -> list[str]:
    """Free space in the RBD pools that hold the fleet's images (store name to pool), for
    the raw copies a refit in the cluster makes."""
    from careen.ceph.cluster import connect

    need: dict[str, int] = {}
    for e in plan.images:
        for store in e.stores:
            if store in pools:
                need[pools[store]] = need.get(pools[store], 0) + (e.virtual_size or e.size)
                break
    if not need:
        return []
    warnings = []
    with connect(access) as cluster:
        ret, out, err = cluster.rados.mon_command(
            json.dumps({"prefix": "df", "format": "json"}), b""
        )
        if ret != 0:
            raise CareenError(
                f"cannot read the pools' free space: {err}", hint="check the Ceph user's caps"
            )
        avail = {p["name"]: int(p["stats"]["max_avail"]) for p in json.loads(out)["pools"]}
    for pool, amount in need.items():
        if pool not in avail:
            warnings.append(f"pool {pool} does not exist in the cluster")
        elif amount > avail[pool]:
            warnings.append(
                f"pool {pool}: {avail[pool] // MiB} MiB free, the fleet's copies need up to "
                f"{amount // MiB} MiB"
            )
    return warnings


def save(plan: Plan, path: Path) -> None:
    data = asdict(plan)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load(path: Path) -> Plan:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(
            f"no plan file {path}", hint="make one with careen fleet plan -o FILE"
        ) from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the plan {path}: {e}", hint="make a new one") from e
    if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
        raise UsageError(
            f"{path} is not a careen fleet plan", hint="make one with careen fleet plan"
        )
    try:
        data["images"] = [Entry(**e) for e in data["images"]]
        return Plan(**data)
    except (KeyError, TypeError) as e:
        raise UsageError(
            f"{path} is not a careen fleet plan (it was changed by hand? {e})",
            hint="make a new one with careen fleet plan",
        ) from e
