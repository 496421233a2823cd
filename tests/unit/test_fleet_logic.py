"""The fleet's pure logic: filter expressions, Glance queries, derived IDs, the state
database's transitions, the task's refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from careen.errors import UsageError
from careen.fleet import plan as fleet_plan
from careen.fleet import select, task
from careen.fleet.state import State, derive_id
from careen.recipe import load as load_recipe

IMAGE: dict[str, Any] = {
    "id": "i1",
    "name": "ubuntu-22.04-base",
    "owner": "p1",
    "visibility": "public",
    "disk_format": "qcow2",
    "stores": "ceph1,file",
    "tags": ["gold"],
    "os_hidden": False,
    "os_distro": "ubuntu",
    "created_at": "2025-03-01T10:00:00Z",
    "updated_at": "2025-06-01T10:00:00Z",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name=ubuntu-*", True),
        ("name=centos-*", False),
        ("name~22\\.04", True),
        ("name~^22", False),
        ("os_distro=ubuntu", True),
        ("os_distro=*", True),
        ("os_version=*", False),
        ("os_distro~^ubu", True),
        ("owner=p1", True),
        ("owner=p2", False),
        ("visibility=public", True),
        ("disk_format=raw", False),
        ("store=file", True),
        ("store=ceph2", False),
        ("tag=gold", True),
        ("tag=silver", False),
        ("hidden=no", True),
        ("hidden=yes", False),
        ("hidden=any", True),
        ("created<2025-04-01", True),
        ("created<2025-02-01T00:00:00Z", False),
        ("updated<2025-06-01T10:00:01Z", True),
        ("updated<2025-06-01", False),
    ],
)
def test_a_filter_matches_as_written(text: str, expected: bool) -> None:
    assert select.parse(text).matches(IMAGE, refitted=False) is expected


def test_refitted_is_relative_to_the_plan() -> None:
    f = select.parse("refitted=no")
    assert f.matches(IMAGE, refitted=False)
    assert not f.matches(IMAGE, refitted=True)


@pytest.mark.parametrize(
    "text",
    [
        "nothing",
        "name<2020-01-01",
        "created=2020-01-01",
        "created<yesterday",
        "hidden=maybe",
        "refitted=any",
        "visibility=everyone",
        "owner~p",
        "name~(",
        "os_distro=",
    ],
)
def test_a_bad_filter_is_a_usage_error_with_the_forms(text: str) -> None:
    with pytest.raises(UsageError) as e:
        select.parse(text)
    assert e.value.hint


def test_glance_is_asked_only_what_it_filters_exactly() -> None:
    where = select.parse_all(
        [
            "name=ubuntu-22.04-base",
            "os_distro=ubuntu",
            "os_version=2*",
            "tag=gold",
            "tag=lts",
            "created<2025-04-01",
            "store=ceph1",
            "name~base",
        ]
    )
    query = select.Selection(where, []).query()
    assert query == {
        "name": "ubuntu-22.04-base",
        "os_distro": "ubuntu",
        "tag": ["gold", "lts"],
        "created_at": "lt:2025-04-01T00:00:00Z",
        "visibility": "all",
    }
    assert select.Selection(select.parse_all(["visibility=community"]), []).query() == {
        "visibility": "community"
    }


def test_two_exact_values_for_one_key_are_refused() -> None:
    where = select.parse_all(["owner=a", "owner=b"])
    with pytest.raises(UsageError):
        select.Selection(where, []).query()


def test_hidden_decides_which_listings_are_read() -> None:
    def listings(*texts: str) -> list[str]:
        return select.Selection(select.parse_all(texts), []).hidden_listings()

    assert listings() == ["false"]
    assert listings("hidden=yes") == ["true"]
    assert listings("hidden=any") == ["false", "true"]


def test_exclusions_win_and_why_names_the_filters() -> None:
    sel = select.Selection(select.parse_all(["os_distro=ubuntu"]), select.parse_all(["tag=x"]))
    assert sel.why(IMAGE, False) == ["os_distro=ubuntu"]
    sel = select.Selection([], select.parse_all(["tag=silver", "tag=gold"]))
    assert sel.why(IMAGE, False) is None
    assert select.Selection([], []).why(IMAGE, False) == ["all images"]


def test_derived_ids_are_stable_and_differ_per_attempt() -> None:
    fleet = "0b8f4a8c-3c1e-4bd5-9f0e-6d4b8f4a8c3c"
    a1 = derive_id(fleet, "src", "digest", 1)
    assert a1 == derive_id(fleet, "src", "digest", 1)
    assert len({a1, derive_id(fleet, "src", "digest", 2), derive_id(fleet, "src", "d2", 1)}) == 3
    assert a1 != derive_id("1b8f4a8c-3c1e-4bd5-9f0e-6d4b8f4a8c3c", "src", "digest", 1)


def _plan(n: int = 2) -> fleet_plan.Plan:
    entries = [
        fleet_plan.Entry(
            id=f"i{i}",
            name=f"n{i}",
            size=1,
            virtual_size=None,
            disk_format="raw",
            status="active",
            stores=[],
            owner="p",
            visibility="private",
            hidden=False,
            queue="careen",
            updated_at="t",
            checksum="md5:x",
            why=["all images"],
        )
        for i in range(n)
    ]
    return fleet_plan.Plan(
        fleet_id="0b8f4a8c-3c1e-4bd5-9f0e-6d4b8f4a8c3c",
        cloud=None,
        recipe={"ref": "empty", "name": "empty", "digest": "d"},
        refit_args=[],
        where=[],
        exclude=[],
        images=entries,
    )


def test_the_plan_file_round_trips_and_rejects_other_files(tmp_path: Path) -> None:
    plan = _plan()
    path = tmp_path / "p.json"
    fleet_plan.save(plan, path)
    assert fleet_plan.load(path) == plan
    (tmp_path / "other.json").write_text(json.dumps({"images": []}))
    with pytest.raises(UsageError, match="not a careen fleet plan"):
        fleet_plan.load(tmp_path / "other.json")
    with pytest.raises(UsageError, match="no plan file"):
        fleet_plan.load(tmp_path / "missing.json")


def test_the_state_database_records_attempts_and_belongs_to_one_plan(tmp_path: Path) -> None:
    plan = _plan()
    db = tmp_path / "p.db"
    state = State.open(db, plan)
    assert [r.state for r in state.rows()] == ["pending", "pending"]
    state.start("i0", 1, "new-1", worker="local")
    state.close()
    state = State.open(db, plan)  # reopened: what was written is there
    row = state.row("i0")
    assert (row.state, row.attempt, row.new_id) == ("running", 1, "new-1")
    assert state.counts() == {"pending": 1, "running": 1}
    state.close()
    other = _plan()
    other.fleet_id = "1b8f4a8c-3c1e-4bd5-9f0e-6d4b8f4a8c3c"
    with pytest.raises(UsageError, match="records fleet"):
        State.open(db, other)


def test_routes_put_images_on_their_store_queue() -> None:
    routes = fleet_plan.parse_routes(["ceph1=east", "file=west"])
    assert fleet_plan.queue_for(IMAGE, routes, "careen") == "east"
    assert fleet_plan.queue_for({"stores": "nfs"}, routes, "careen") == "careen"
    with pytest.raises(UsageError):
        fleet_plan.parse_routes(["ceph1"])


def _task(tmp_path: Path, **over: Any) -> dict[str, Any]:
    base = {
        "source_id": "s",
        "attempt": 1,
        "new_id": "n",
        "recipe": "empty",
        "recipe_digest": load_recipe("empty").digest,
        "refit_args": [],
        "log": str(tmp_path / "log"),
    }
    return base | over


def test_a_task_with_another_recipe_digest_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    result = task.refit_image(_task(tmp_path, recipe_digest="0" * 16))
    assert result["status"] == "refused"
    assert "digest" in result["error"]
    assert not (tmp_path / "log").exists()
    result = task.refit_image(_task(tmp_path, recipe="/nonexistent/recipe.yaml"))
    assert result["status"] == "refused"


def test_a_task_may_pass_only_known_flags_to_refit(tmp_path: Path) -> None:
    task.check_refit_args(["--backend", "host", "--import", "--retire=hide"])
    for bad in (["--run", "rm -rf /"], ["--script", "x.sh"], ["-o", "/etc/passwd"]):
        result = task.refit_image(_task(tmp_path, refit_args=bad))
        assert result["status"] == "refused", bad


def test_a_plan_file_changed_by_hand_is_a_usage_error(tmp_path: Path) -> None:
    for body in ({"version": 1}, {"version": 1, "images": [{"bogus": 1}]}):
        path = tmp_path / "p.json"
        path.write_text(json.dumps(body))
        with pytest.raises(UsageError, match="not a careen fleet plan"):
            fleet_plan.load(path)


def test_bad_run_options_are_refused_before_the_plan_is_read(tmp_path: Path) -> None:
    from careen.cli import main

    missing = str(tmp_path / "no-such-plan.json")
    for extra in (["--jobs", "0"], ["--limit", "downloads=0"], ["--broker", "amqp://x"]):
        assert main(["fleet", "run", missing, *extra]) == 2
    assert not (tmp_path / "no-such-plan.db").exists()
