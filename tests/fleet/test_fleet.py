"""careen fleet against the session's real Glance: filters, a parallel run, a killed
coordinator, derived IDs that collide, retire and rollback."""

from __future__ import annotations

import csv
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from glance.conftest import listed, show
from integration.util import CAREEN, careen_env
from services.cloud import disconnect, image_v2
from services.glance import FILE_STORE
from services.keystone import identity_v3

from careen.fleet.state import derive_id

from .conftest import BROKEN, IDS, OLD_DATE, TAG, Fleet, fleet_recipe, new_images

pytestmark = [pytest.mark.glance, pytest.mark.images, pytest.mark.root]

JSON_PATCH = "application/openstack-images-v2.1-json-patch"


def plan(run: Any, out: Path, *filters: str, recipe: str = "reset-identity") -> dict[str, Any]:
    proc = run(
        "fleet",
        "plan",
        "-o",
        str(out),
        "--force",
        "-r",
        recipe,
        "--page-size",
        "3",
        "--format",
        "json",
        "--backend",
        "host",
        *filters,
    )
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def selected(run: Any, out: Path, *filters: str, recipe: str = "reset-identity") -> set[str]:
    return {e["id"] for e in plan(run, out, *filters, recipe=recipe)["images"]}


def ids(*names: str) -> set[str]:
    return {IDS[n] for n in names}


def snapshot(fleet: Fleet) -> dict[str, str]:
    return {i["id"]: i["updated_at"] for i in listed(fleet.cloud, visibility="all")}


@pytest.mark.timeout(300)
def test_each_filter_selects_exactly_its_images_and_plan_changes_nothing(
    fleet: Fleet, fleet_careen: Any, tmp_path: Path
) -> None:
    before = snapshot(fleet)
    out = tmp_path / "plan.json"
    tagged = ids(
        "deb-private",
        "deb-public",
        "deb-demo",
        "cent-shared",
        "cent-community",
        "refit-product",
        *BROKEN,
    )
    demo_project = fleet.images["deb-demo"]["owner"]
    cases: list[tuple[list[str], set[str]]] = [
        (["-w", f"tag={TAG}"], tagged),
        (["-w", "name=fleet-deb-*"], ids("deb-private", "deb-public", "deb-demo", "refit-product")),
        (["-w", "name~^fleet-cent-", "-w", "hidden=any"], ids("cent-shared", "cent-community")),
        (["-w", "os_distro=centos"], ids("cent-shared", "cent-community")),
        (["-w", "os_version=*"], ids("deb-demo")),
        (["-w", f"owner={demo_project}"], ids("deb-demo")),
        (["-w", "visibility=community"], ids("cent-community")),
        (["-w", f"tag={TAG}", "-w", "disk_format=raw"], ids("broken-noroot")),
        (["-w", "tag=gold"], ids("deb-public")),
        (["-w", "hidden=yes", "-w", f"tag={TAG}"], ids("deb-hidden")),
        (["-w", f"tag={TAG}", "-w", "refitted=no"], tagged - ids("deb-private", "refit-product")),
        (
            ["-w", f"tag={TAG}", "-w", "refitted=yes", "-w", "hidden=any"],
            ids("deb-private", "refit-product"),
        ),
        (["-w", f"tag={TAG}", "-w", f"created<{OLD_DATE}"], set()),
        (["-w", "name=other-image", "-w", "updated<2100-01-01"], ids("other")),
        (
            ["-w", f"tag={TAG}", "-x", "name=fleet-broken-*", "-x", "os_distro=centos"],
            ids("deb-private", "deb-public", "deb-demo", "refit-product"),
        ),
        (["-w", f"tag={TAG}", "-w", "store=no-such-store"], set()),
        (["-w", "tag=gold", "-w", f"store={FILE_STORE}"], ids("deb-public")),
    ]
    for filters, expected in cases:
        assert selected(fleet_careen, out, *filters) == expected, filters
    data = plan(
        fleet_careen,
        out,
        "-w",
        "name=fleet-deb-public",
        "--route",
        f"{FILE_STORE}=east",
        "--route",
        "ceph9=north",
        "--queue",
        "west",
    )
    (entry,) = data["images"]
    src = fleet.images["deb-public"]
    assert entry["size"] == src["size"]
    assert entry["checksum"] == f"{src['os_hash_algo']}:{src['os_hash_value']}"
    assert entry["updated_at"] == src["updated_at"]
    assert src["stores"] == FILE_STORE and entry["stores"] == [FILE_STORE]
    assert entry["queue"] == "east"
    assert entry["why"] == ["name=fleet-deb-public"]
    assert data["warnings"] == [
        "the cloud enforces no image quota through Keystone (unified limits are off)"
    ]
    assert json.loads(out.read_text())["fleet_id"] == data["fleet_id"]
    bad = fleet_careen("fleet", "plan", "-o", str(out), "--force", "-w", "created=yesterday")
    assert bad.returncode == 2 and "created<DATE" in bad.stderr, bad.stderr
    assert snapshot(fleet) == before


def trace_overlap(path: Path) -> int:
    events = sorted(
        (e["time"], 1 if e["event"] == "start" else -1)
        for e in map(json.loads, path.read_text().splitlines())
    )
    level = most = 0
    for _, step in events:
        level += step
        most = max(most, level)
    return most


@pytest.mark.timeout(900)
def test_fleet_run_in_parallel_then_retire_and_roll_back(
    fleet: Fleet, fleet_careen: Any, tmp_path: Path
) -> None:
    recipe, digest = fleet_recipe(tmp_path, "jobs")
    out = tmp_path / "jobs.json"
    data = plan(fleet_careen, out, "-w", f"tag={TAG}", "-x", "os_distro=centos", recipe=str(recipe))
    fleet_id = data["fleet_id"]
    good = ids("deb-private", "deb-public", "refit-product")
    assert {e["id"] for e in data["images"]} == good | ids("deb-demo", *BROKEN)
    # A source that changes after planning is skipped, not refitted from the new state.
    r = fleet.cloud.admin_images.patch(
        f"/images/{IDS['deb-demo']}",
        json=[{"op": "add", "path": "/careen_touched", "value": "yes"}],
        headers={"Content-Type": JSON_PATCH},
    )
    assert r.status_code == 200, r.text
    dry = fleet_careen("fleet", "run", str(out), "--dry-run")
    assert dry.returncode == 0 and "Nothing was changed" in dry.stdout, dry.stderr
    assert not out.with_suffix(".db").exists()
    trace = tmp_path / "trace.jsonl"
    proc = fleet_careen(
        "fleet",
        "run",
        str(out),
        "--jobs",
        "3",
        "--limit",
        "downloads=2",
        "--limit",
        "glance-rate=50",
        "--format",
        "json",
        env={"CAREEN_FLEET_TRACE": str(trace)},
    )
    assert proc.returncode == 1, proc.stderr
    assert "3 image(s) failed" in proc.stderr
    report = json.loads(proc.stdout)
    assert report == json.loads(out.with_suffix(".report.json").read_text())
    done = {i["source_id"]: i for i in report["succeeded"]}
    assert set(done) == good
    for sid, item in done.items():
        assert item["new_id"] == derive_id(fleet_id, sid, digest, 1)
        assert item["bytes"] > 0 and item["seconds"] > 0
    failed = {i["source_id"]: i for i in report["failed"]}
    assert set(failed) == ids(*BROKEN)
    assert "qcow2" in failed[IDS["broken-corrupt"]]["error"]
    assert "root" in failed[IDS["broken-noroot"]]["error"]
    assert "deactivated" in failed[IDS["broken-deactivated"]]["error"]
    for item in failed.values():
        assert Path(item["log"]).is_file()
    assert report["skipped"] == [
        {
            "source_id": IDS["deb-demo"],
            "name": "fleet-deb-demo",
            "reason": report["skipped"][0]["reason"],
        }
    ]
    assert report["skipped"][0]["reason"].startswith("changed since planning")
    rows = list(csv.reader(out.with_suffix(".report.csv").open()))
    assert rows[0][0] == "result" and len(rows) == 1 + 7
    assert 2 <= trace_overlap(trace) <= 3
    # The limits reached the refits: their slot files and the rate's time stamp.
    assert sorted(p.name for p in out.with_suffix(".limits").iterdir()) == [
        "downloads.0",
        "downloads.1",
        "glance-rate",
    ]
    made = new_images(fleet.cloud, digest)
    assert sorted(i["careen_source_image"] for i in made) == sorted(good)
    for image in made:
        assert image["status"] == "active"
        assert image["site_fleet_test"] == "jobs"
        assert image["id"] == done[image["careen_source_image"]]["new_id"]
    # Running the plan again hands out nothing: done stays done, failed stays failed.
    again = fleet_careen("fleet", "run", str(out), "--jobs", "3")
    assert again.returncode == 1, again.stderr
    assert [line for line in again.stdout.splitlines() if line.startswith("done")] == []
    assert len(new_images(fleet.cloud, digest)) == 3
    # Retire hides the old images; rollback deletes the new ones and shows the old again.
    retired = fleet_careen("fleet", "retire", str(out), "--retire", "hide")
    assert retired.returncode == 0, retired.stderr
    for sid in good:
        assert show(fleet.cloud.admin_images, sid)["os_hidden"] is True
    back = fleet_careen("fleet", "rollback", str(out))
    assert back.returncode == 0, back.stderr
    for sid in good:
        assert show(fleet.cloud.admin_images, sid)["os_hidden"] is False
    assert new_images(fleet.cloud, digest) == []
    final = json.loads(out.with_suffix(".report.json").read_text())
    assert {i["source_id"] for i in final["rolled_back"]} == good


def db_states(db: Path) -> dict[str, str]:
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(conn.execute("SELECT source_id, state FROM images").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


@pytest.mark.timeout(900)
def test_a_killed_coordinator_resumes_and_publishes_each_image_once(
    fleet: Fleet, fleet_careen: Any, tmp_path: Path
) -> None:
    recipe, digest = fleet_recipe(tmp_path, "kill")
    out = tmp_path / "kill.json"
    sources = ids("deb-public", "cent-shared", "cent-community")
    plan(fleet_careen, out, "-w", "name~^fleet-(deb-pub|cent-)", recipe=str(recipe))
    env = {
        **careen_env(tmp_path),
        "CAREEN_STATE_DIR": str(fleet_careen.state),
        "OS_CLOUD": "careen-admin",
    }
    coordinator = subprocess.Popen(
        [str(CAREEN), "fleet", "run", str(out), "--jobs", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = out.with_suffix(".db")
    deadline = time.monotonic() + 600
    while "done" not in db_states(db).values():
        assert coordinator.poll() is None, "the fleet ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.5)
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait()
    states = db_states(db)
    assert "running" in states.values() or "pending" in states.values(), states
    proc = fleet_careen("fleet", "run", str(out), "--jobs", "2", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {i["source_id"] for i in report["succeeded"]} == sources
    # The refits the dead coordinator had running were reconciled: published or pending.
    assert "reconciled: " in proc.stderr
    made = new_images(fleet.cloud, digest)
    assert sorted(i["careen_source_image"] for i in made) == sorted(sources)
    assert all(i["status"] == "active" for i in made)
    left = subprocess.run(["pgrep", "-f", "--new-image-id"], capture_output=True, text=True)
    assert left.stdout == ""
    rollback = fleet_careen("fleet", "rollback", str(out))
    assert rollback.returncode == 0, rollback.stderr
    assert new_images(fleet.cloud, digest) == []


@pytest.mark.timeout(600)
def test_max_failures_stops_handing_out(fleet: Fleet, fleet_careen: Any, tmp_path: Path) -> None:
    out = tmp_path / "broken.json"
    plan(fleet_careen, out, "-w", "name=fleet-broken-*")
    proc = fleet_careen("fleet", "run", str(out), "--max-failures", "1", "--format", "json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["failed"]) == 1 and len(report["pending"]) == 2
    assert report["stopped"] == "1 failure(s): --max-failures reached"


@pytest.mark.timeout(600)
def test_a_derived_id_that_is_taken(fleet: Fleet, fleet_careen: Any, tmp_path: Path) -> None:
    recipe, digest = fleet_recipe(tmp_path, "taken")
    admin = fleet.cloud.admin_images
    src = IDS["deb-public"]
    leftover = "f1ee7000-0000-4000-8000-00000000aa01"
    foreign = "f1ee7000-0000-4000-8000-00000000aa02"
    r = admin.post(
        "/images",
        json={
            "id": leftover,
            "name": "leftover",
            "disk_format": "qcow2",
            "container_format": "bare",
            "careen_source_image": src,
            "careen_recipe_digest": digest,
        },
    )
    assert r.status_code == 201, r.text
    r = admin.post(
        "/images",
        json={
            "id": foreign,
            "name": "someone-else",
            "disk_format": "qcow2",
            "container_format": "bare",
        },
    )
    assert r.status_code == 201, r.text

    def refit(new_id: str) -> Any:
        return fleet_careen(
            "refit",
            f"glance:{src}",
            "-o",
            "glance:",
            "-r",
            str(recipe),
            "--backend",
            "host",
            "--new-image-id",
            new_id,
            "--format",
            "json",
        )

    theirs = refit(foreign)
    assert theirs.returncode == 3, theirs.stderr
    assert "already taken by image 'someone-else'" in theirs.stderr
    assert show(admin, foreign)["status"] == "queued"
    spent = refit(leftover)  # an unfinished leftover of the same work: deleted, ID spent
    assert spent.returncode == 3, spent.stderr
    assert "unfinished leftover" in spent.stderr
    assert admin.get(f"/images/{leftover}").status_code == 404
    assert refit(leftover).returncode == 3  # a deleted ID is never given out again
    published = "f1ee7000-0000-4000-8000-00000000aa03"
    assert refit(published).returncode == 0
    assert show(admin, published)["status"] == "active"
    again = refit(published)  # published already: never twice
    assert again.returncode == 3, again.stderr
    assert "published by an earlier run" in again.stderr
    assert [i["id"] for i in new_images(fleet.cloud, digest)] == [published]
    for image_id in (published, foreign):
        assert admin.delete(f"/images/{image_id}").status_code == 204


@pytest.mark.timeout(600)
def test_a_canary_is_verified_by_boot_before_publishing_and_the_run_stops(
    fleet: Fleet, fleet_careen: Any, tmp_path: Path
) -> None:
    # The fleet's good images have no kernel of their own: verification refuses them
    # before booting, so the canary fails, nothing is published, and the run stops.
    recipe, digest = fleet_recipe(tmp_path, "canary")
    out = tmp_path / "canary.json"
    plan(fleet_careen, out, "-w", "name~^fleet-cent-", recipe=str(recipe))
    proc = fleet_careen("fleet", "run", str(out), "--canary", "1", "--format", "json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    (failed,) = report["failed"]
    assert "no bootable kernel" in failed["error"]
    assert report["stopped"] == "canary: 1 image(s) refitted; look at them first"
    assert [p["state"] for p in report["pending"]] == ["pending"]
    assert new_images(fleet.cloud, digest) == []


@pytest.mark.timeout(300)
def test_plan_warns_when_the_image_quota_cannot_hold_the_fleet(
    fleet: Fleet, fleet_careen: Any, tmp_path: Path
) -> None:
    # A Glance that enforces Keystone's unified limits: two images a project by default.
    cloud = fleet.cloud
    region = cloud.glance_auth.region
    conn = cloud.keystone.connect_admin()
    identity = identity_v3(conn)
    service = identity.create_service(name="glance-quota", type="image-quota")
    made: list[Any] = []
    user = identity.find_user(cloud.glance_auth.username, ignore_missing=False)
    reader = identity.find_role("reader", ignore_missing=False)
    try:
        endpoint = identity.create_endpoint(
            service_id=service.id, interface="public", url="http://127.0.0.1:9", region_id=region
        )
        identity.assign_system_role_to_user(user, reader, "all")
        limits = {
            "image_count_total": 2,
            "image_size_total": 1000,
            "image_stage_total": 1000,
            "image_count_uploading": 10,
        }
        for name, value in limits.items():
            made.append(
                identity.create_registered_limit(
                    service_id=service.id,
                    region_id=region,
                    resource_name=name,
                    default_limit=value,
                )
            )
        options = {
            "DEFAULT": {"use_keystone_limits": "True"},
            "oslo_limit": {
                "auth_type": "password",
                "auth_url": cloud.glance_auth.auth_url,
                "username": cloud.glance_auth.username,
                "password": cloud.glance_auth.password,
                "user_domain_id": "default",
                "system_scope": "all",
                "endpoint_id": str(endpoint.id),
            },
        }
        with cloud.another_glance(tmp_path / "g2", options=options) as g2:
            entry = yaml.safe_load(cloud.clouds_yaml.read_text())["clouds"]["careen-demo"]
            clouds = tmp_path / "clouds.yaml"
            clouds.write_text(
                yaml.safe_dump({"clouds": {"g2": {**entry, "image_endpoint_override": g2.url}}})
            )
            demo = cloud.connect(cloud.demo_cloud, image_endpoint_override=g2.url)
            images = image_v2(demo)
            try:
                for n in range(2):
                    r = images.post(
                        "/images",
                        json={
                            "name": f"quota-{n}",
                            "disk_format": "raw",
                            "container_format": "bare",
                        },
                    )
                    assert r.status_code == 201, r.text
                out = tmp_path / "quota.json"
                proc = fleet_careen(
                    "fleet",
                    "plan",
                    "-o",
                    str(out),
                    "--os-cloud",
                    "g2",
                    "-w",
                    "name=quota-*",
                    "--format",
                    "json",
                    env={"OS_CLIENT_CONFIG_FILE": str(clouds)},
                )
                assert proc.returncode == 0, proc.stderr
                warnings = json.loads(proc.stdout)["warnings"]
                assert warnings == [
                    "quota image_count_total: 0 left, the fleet needs 2 (images that do not "
                    "fit will fail)"
                ]
            finally:
                disconnect(demo)
    finally:
        for limit in made:
            identity.delete_registered_limit(limit)
        identity.unassign_system_role_from_user(user, reader, "all")
        identity.delete_service(service)
        disconnect(conn)
