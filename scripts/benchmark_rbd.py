"""Benchmark careen's refit of a Glance image inside Ceph against the manual procedure.

What is measured, on the MBR raw sample (a used Debian 12, 2 GiB virtual) uploaded once
through a Glance whose default store is RBD:

1. careen: the wall time of the whole command `careen refit glance:OLD -o glance:NAME -r
   reset-identity --backend host --os-cloud ... --ceph-conf ... --ceph-user careen
   --keyring ... --format json` (copy `POOL/OLD@snap` to `POOL/<new ID>` with librbd,
   refit it in place through a qemu-storage-daemon FUSE export, snapshot and protect,
   hash, register the location with Glance, wait for `active`). The bytes that crossed
   the Glance API during the command are read from gunicorn's access log: response body
   bytes plus each request's Content-Length, and the number of requests to `/file` or
   `/stage` (data transfers).
2. manual: what an operator types for the same result, one tool at a time: `rbd cp
   POOL/OLD@snap POOL/NAME`; a qemu-storage-daemon FUSE export of it (no krbd or nbd on
   this kind of host), `sfdisk --json` for the partition, `losetup` at its offset,
   `mount`; the reset-identity recipe's changes as a shell script (`rm` of cloud-init's
   state, logs and the network identity, an empty machine-id, no SSH host keys);
   `umount`, `losetup -d`, stop the daemon; `rbd snap create` and `rbd snap protect`;
   create the Glance record; sha512 and md5 of `rbd export POOL/NAME@snap -`; the PATCH
   that adds the location with those hashes as validation data; wait for `active`.
   One difference stays: careen runs the guest's own `cloud-init clean --logs` in a
   chroot, where the script removes the same paths with `rm`.
3. copy methods, in this process with the Python bindings: librbd's copy of the source
   snapshot (what careen does) against a clone of it flattened at once.

Each new image is deleted (through Glance for the first two, with librbd for the
others) before the next run; deleting is not timed. The methods run in one order in
even rounds and in the reverse order in odd ones. Figures are medians over the rounds;
ratios are of medians. Every run is checked (exit status, an active image with the
hashes computed here), so a failed run is never timed as a fast one.

Keystone, a one-OSD memstore Ceph and Glance all run from the test suite's helpers
(tests/services), with all of their state under one temporary directory, and are
stopped at the end, on an error or on Ctrl-C too. Run as root:
`.venv/bin/python scripts/benchmark_rbd.py [--rounds N]`. Progress goes to stderr, the
results to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from services.ceph import Ceph, missing_binaries, start_ceph
from services.cloud import Cloud, disconnect, image_v2, start_cloud
from services.glance import Glance
from services.process import NotInstalled, service_venv

from careen.guest.ops import CLOUD_INIT_LOGS, NETWORK_IDENTITY, SSH_HOST_KEYS
from careen.samples import Layout, sample_image

STORE = "ceph1"
SNAP = "snap"
RECIPE = "reset-identity"
JSON_PATCH = "application/openstack-images-v2.1-json-patch"
CHUNK = 4 << 20
RUN_TIMEOUT = 900.0
ACTIVE_TIMEOUT = 120.0

CAREEN = "careen"
MANUAL = "manual"
COPY = "librbd copy"
CLONE = "clone + flatten"
METHODS = (CAREEN, MANUAL, COPY, CLONE)

# The reset-identity recipe's changes (careen.guest.ops), as an operator's shell script;
# $1 is the mounted root.
RESET_IDENTITY = "\n".join(
    [
        'r="$1"',
        'if [ -d "$r/var/lib/cloud" ]; then',
        '  find "$r/var/lib/cloud" -mindepth 1 -maxdepth 1 ! -name seed -exec rm -rf {} +',
        "fi",
        *(f'rm -f "$r"{path}' for path in CLOUD_INIT_LOGS),
        *(f'rm -rf "$r"{pattern}' for pattern in NETWORK_IDENTITY),
        'for f in "$r"/etc/sysconfig/network-scripts/ifcfg-*; do',
        '  if grep -qs cloud-init "$f"; then rm -f "$f"; fi',
        "done",
        'if [ -e "$r/etc/machine-id" ]; then : > "$r/etc/machine-id"; fi',
        'if [ ! -L "$r/var/lib/dbus/machine-id" ]; then rm -f "$r/var/lib/dbus/machine-id"; fi',
        f'rm -f "$r"{SSH_HOST_KEYS}',
    ]
)


class BenchError(Exception):
    """A run failed or the machine cannot run the benchmark."""


def tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = RUN_TIMEOUT,
    log: Path | None = None,
) -> str:
    """Run a command to completion; its stdout. With `log`, its output goes there instead
    (for a daemon that forks: a pipe would stay open behind it)."""
    args = [os.fspath(a) for a in argv]
    if log is not None:
        with log.open("ab") as out:
            done = subprocess.run(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=timeout
            )
        if done.returncode != 0:
            raise BenchError(f"{' '.join(args)} exited {done.returncode}:\n{tail(log.read_text())}")
        return ""
    proc = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(args)} exited {proc.returncode}:\n{tail(proc.stderr)}")
    return proc.stdout


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Steps:
    """Seconds per named step of one run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - start


@dataclass(frozen=True)
class Request:
    """One line of the Glance access log (ACCESS_LOG_FORMAT in tests/services/process.py)."""

    method: str
    path: str
    status: int
    sent: int
    body: int

    @property
    def is_data(self) -> bool:
        return self.path.split("?", 1)[0].endswith(("/file", "/stage"))


@dataclass(frozen=True)
class Traffic:
    requests: list[Request]

    @property
    def bytes(self) -> int:
        return sum(r.sent + r.body for r in self.requests)

    @property
    def data_requests(self) -> int:
        return sum(r.is_data for r in self.requests)

    def kinds(self) -> str:
        ids = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
        count = Counter(f"{r.method} {ids.sub('ID', r.path)} {r.status}" for r in self.requests)
        return ", ".join(f"{kind} x{n}" for kind, n in count.items())


def _number(field: str) -> int:
    return int(field) if field.isdigit() else 0


def parse_access_line(line: str) -> Request:
    method, path, status, sent, body = line.split(" ", 5)[:5]
    return Request(method, path, int(status), _number(sent), _number(body))


@dataclass
class Bench:
    """Everything the runs share: the services, the source image, a librados client."""

    root: Path
    ceph: Ceph
    cloud: Cloud
    glance: Glance
    clouds_yaml: Path
    images: Any  # the admin's image API on the Ceph-backed Glance
    access_log: Path
    source_id: str = ""
    source_size: int = 0
    ioctx: Any = None
    careen_env: dict[str, str] = field(default_factory=dict)

    @property
    def pool(self) -> str:
        return self.ceph.pool

    def rbd(self, *args: str) -> str:
        return self.ceph.run("rbd", *args, user=self.ceph.careen, timeout=RUN_TIMEOUT)

    def pool_images(self) -> list[str]:
        return self.rbd("ls", "-p", self.pool).split()

    def log_offset(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def traffic_since(self, offset: int) -> Traffic:
        """The requests logged from `offset` on, once the log has stopped growing (gunicorn
        writes a line after the response is sent, so the client may be faster)."""
        size, still = -1, 0
        while still < 3:
            time.sleep(0.1)
            now = self.log_offset()
            still = still + 1 if now == size else 0
            size = now
        with self.access_log.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode().splitlines()
        return Traffic([parse_access_line(line) for line in lines if line.strip()])


def write_clouds_yaml(cloud: Cloud, glance: Glance, dest: Path) -> None:
    import yaml

    entries = yaml.safe_load(cloud.clouds_yaml.read_text())["clouds"]
    admin = {**entries[cloud.admin_cloud], "image_endpoint_override": glance.url}
    dest.write_text(yaml.safe_dump({"clouds": {"bench-admin": admin}}))
    dest.chmod(0o600)


@contextmanager
def services(root: Path) -> Iterator[Bench]:
    """Keystone, Ceph and a Glance whose default store is RBD, all under `root`."""
    with ExitStack() as stack:
        progress("starting Keystone and Glance (file store) ...")
        cloud = stack.enter_context(start_cloud(root / "cloud"))
        progress("starting Ceph ...")
        ceph = stack.enter_context(start_ceph(root / "ceph"))
        progress("starting Glance with the rbd store ...")
        access_log = root / "glance-rbd-access.log"
        env = ceph.glance_env(root)
        glance = stack.enter_context(
            cloud.another_glance(
                root / "glance-rbd",
                backends={STORE: "rbd"},
                options=ceph.glance_store_options(STORE),
                env=env,
                access_log=access_log,
            )
        )
        clouds_yaml = root / "clouds.yaml"
        write_clouds_yaml(cloud, glance, clouds_yaml)
        admin = cloud.connect(cloud.admin_cloud, image_endpoint_override=glance.url)
        stack.callback(disconnect, admin)
        bench = Bench(root, ceph, cloud, glance, clouds_yaml, image_v2(admin), access_log)
        bench.ioctx = stack.enter_context(rados_pool(ceph))
        bench.careen_env = careen_env(bench)
        yield bench


@contextmanager
def rados_pool(ceph: Ceph) -> Iterator[Any]:
    import rados

    cluster = rados.Rados(conffile=str(ceph.conf), rados_id=ceph.careen.id)
    cluster.connect(timeout=30)
    try:
        ioctx = cluster.open_ioctx(ceph.pool)
        try:
            yield ioctx
        finally:
            ioctx.close()
    finally:
        cluster.shutdown()


def careen_env(bench: Bench) -> dict[str, str]:
    tmp = bench.root / "careen-tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_") and k != "CEPH_ARGS"}
    return {
        **env,
        "OS_CLIENT_CONFIG_FILE": str(bench.clouds_yaml),
        "CAREEN_STATE_DIR": str(bench.root / "careen-state"),
        "TMPDIR": str(tmp),
    }


def show(bench: Bench, image_id: str) -> dict[str, Any]:
    r = bench.images.get(f"/images/{image_id}")
    if r.status_code != 200:
        raise BenchError(f"GET image {image_id}: HTTP {r.status_code}: {r.text[:300]}")
    body: dict[str, Any] = r.json()
    return body


def wait_active(bench: Bench, image_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + ACTIVE_TIMEOUT
    while True:
        image = show(bench, image_id)
        if image["status"] == "active":
            return image
        if image["status"] in ("killed", "deleted") or time.monotonic() > deadline:
            raise BenchError(f"image {image_id} is {image['status']}, not active")
        time.sleep(0.2)


def create_record(bench: Bench, name: str) -> str:
    body = {"name": name, "disk_format": "raw", "container_format": "bare"}
    r = bench.images.post("/images", json=body)
    if r.status_code != 201:
        raise BenchError(f"create image {name}: HTTP {r.status_code}: {r.text[:300]}")
    return str(r.json()["id"])


def delete_image(bench: Bench, image_id: str) -> None:
    r = bench.images.delete(f"/images/{image_id}")
    if r.status_code not in (204, 404):
        raise BenchError(f"delete image {image_id}: HTTP {r.status_code}: {r.text[:300]}")


def upload_source(bench: Bench, sample: Path) -> None:
    progress(f"uploading {sample.name} ({sample.stat().st_size >> 20} MiB) through Glance ...")
    image_id = create_record(bench, "bench-rbd-source")
    with sample.open("rb") as f:
        r = bench.images.put(
            f"/images/{image_id}/file",
            data=f,
            headers={"Content-Type": "application/octet-stream"},
        )
    if r.status_code != 204:
        raise BenchError(f"upload: HTTP {r.status_code}: {r.text[:300]}")
    image = wait_active(bench, image_id)
    url = image["locations"][0]["url"]
    if url != f"rbd://{bench.ceph.fsid}/{bench.pool}/{image_id}/{SNAP}":
        raise BenchError(f"the source is not in the RBD store: {url}")
    bench.source_id = image_id
    bench.source_size = int(image["size"])


def gone_from_pool(bench: Bench, name: str) -> None:
    """Glance's delete removes the RBD image it points at; remove it if it did not."""
    if name in bench.pool_images():
        progress(f"  {bench.pool}/{name} outlived its Glance image: removing it")
        bench.rbd("snap", "unprotect", f"{bench.pool}/{name}@{SNAP}")
        bench.rbd("snap", "purge", f"{bench.pool}/{name}")
        bench.rbd("rm", f"{bench.pool}/{name}")


@dataclass
class Outcome:
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)
    traffic: Traffic | None = None
    copied_bytes: int = 0


def run_careen(bench: Bench, n: int) -> Outcome:
    name = f"bench-careen-{n}-{uuid.uuid4().hex[:6]}"
    ceph = bench.ceph
    argv = [str(Path(sys.executable).parent / "careen"), "refit", f"glance:{bench.source_id}"]
    argv += ["-o", f"glance:{name}", "-r", RECIPE, "--backend", "host"]
    argv += ["--os-cloud", "bench-admin", "--ceph-conf", str(ceph.conf)]
    argv += ["--ceph-user", ceph.careen.id, "--keyring", str(ceph.careen.keyring)]
    argv += ["--format", "json"]
    offset = bench.log_offset()
    start = time.monotonic()
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=bench.careen_env,
        timeout=RUN_TIMEOUT,
    )
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise BenchError(f"careen exited {proc.returncode}:\n{tail(proc.stderr)}")
    traffic = bench.traffic_since(offset)
    glance = json.loads(proc.stdout)["glance"]
    new_id = str(glance["new_image"]["id"])
    try:
        image = show(bench, new_id)
        if image["status"] != "active" or image["name"] != name:
            raise BenchError(f"careen's new image {new_id} is {image['status']}")
    finally:
        delete_image(bench, new_id)
        gone_from_pool(bench, new_id)
    figures = glance["figures"]
    return Outcome(seconds, dict(figures["seconds"]), traffic, int(figures["copied_bytes"]))


def stop_qsd(pidfile: Path) -> None:
    pid = int(pidfile.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise BenchError(f"qemu-storage-daemon {pid} did not stop")
        time.sleep(0.02)


def export_and_reset(bench: Bench, name: str, work: Path, steps: Steps) -> None:
    """Export, loop, mount, change, and undo all of it in reverse."""
    view, pidfile, mnt = work / "export.raw", work / "qsd.pid", work / "root"
    view.touch()
    mnt.mkdir()
    node = f"driver=rbd,node-name=disk0,pool={bench.pool},image={name}"
    node += f",conf={bench.ceph.conf},user={bench.ceph.careen.id}"
    export = f"type=fuse,id=exp0,node-name=disk0,mountpoint={view},writable=on"
    with ExitStack() as undo:
        with steps.timed("export, loop, mount"):
            qsd = ["qemu-storage-daemon", "--daemonize", "--pidfile", str(pidfile)]
            run([*qsd, "--blockdev", node, "--export", export], log=work / "qsd.log")
            undo.callback(steps.timed("stop export")(stop_qsd), pidfile)
            table = json.loads(run(["sfdisk", "--json", view]))["partitiontable"]
            sector = int(table.get("sectorsize", 512))
            part = table["partitions"][0]
            offset, size = int(part["start"]) * sector, int(part["size"]) * sector
            loop = ["losetup", "--find", "--show", "--offset", str(offset)]
            device = run([*loop, "--sizelimit", str(size), view]).strip()
            undo.callback(steps.timed("losetup -d")(run), ["losetup", "-d", device])
            run(["mount", device, mnt])
            undo.callback(steps.timed("umount")(run), ["umount", mnt])
        with steps.timed("shell changes"):
            run(["sh", "-eu", "-c", RESET_IDENTITY, "reset-identity", mnt])
        check_reset(mnt)


def check_reset(root: Path) -> None:
    """The shell script did what the recipe does (checked untimed, before unmounting)."""
    left = [p.name for p in (root / "var/lib/cloud").iterdir() if p.name != "seed"]
    left += [p.name for p in (root / "etc/ssh").glob("ssh_host_*")]
    if left or (root / "etc/machine-id").read_text():
        raise BenchError(f"the manual reset left {left} or a machine-id behind")


def export_hashes(bench: Bench, spec: str) -> dict[str, str]:
    """sha512 and md5 of `rbd export SPEC -`, read from the pipe."""
    sha512, md5 = hashlib.sha512(), hashlib.md5(usedforsecurity=False)
    ceph = bench.ceph
    argv = ["rbd", "--conf", str(ceph.conf), "--id", ceph.careen.id, "export", "--no-progress"]
    with subprocess.Popen(
        [*argv, spec, "-"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(CHUNK):
            sha512.update(chunk)
            md5.update(chunk)
    if proc.returncode != 0:
        raise BenchError(f"rbd export {spec} exited {proc.returncode}")
    return {"sha512": sha512.hexdigest(), "md5": md5.hexdigest()}


def add_location(bench: Bench, image_id: str, url: str, digests: dict[str, str]) -> None:
    value = {
        "url": url,
        "metadata": {"store": STORE},
        "validation_data": {
            "checksum": digests["md5"],
            "os_hash_algo": "sha512",
            "os_hash_value": digests["sha512"],
        },
    }
    r = bench.images.patch(
        f"/images/{image_id}",
        json=[{"op": "add", "path": "/locations/-", "value": value}],
        headers={"Content-Type": JSON_PATCH},
    )
    if r.status_code != 200:
        raise BenchError(f"add location: HTTP {r.status_code}: {r.text[:300]}")


def manual_sequence(bench: Bench, name: str, steps: Steps, cleanup: ExitStack) -> str:
    """The operator's procedure; the new Glance image's ID."""
    pool = bench.pool
    with steps.timed("rbd cp"):
        bench.rbd("cp", f"{pool}/{bench.source_id}@{SNAP}", f"{pool}/{name}")
    cleanup.callback(gone_from_pool, bench, name)
    work = Path(tempfile.mkdtemp(prefix="manual-", dir=bench.root))
    cleanup.callback(shutil.rmtree, work)
    export_and_reset(bench, name, work, steps)
    with steps.timed("rbd snap create, protect"):
        bench.rbd("snap", "create", f"{pool}/{name}@{SNAP}")
        bench.rbd("snap", "protect", f"{pool}/{name}@{SNAP}")
    with steps.timed("create record"):
        image_id = create_record(bench, name)
    cleanup.callback(delete_image, bench, image_id)
    with steps.timed("rbd export | sha512, md5"):
        digests = export_hashes(bench, f"{pool}/{name}@{SNAP}")
    with steps.timed("PATCH location, wait active"):
        add_location(bench, image_id, f"rbd://{bench.ceph.fsid}/{pool}/{name}/{SNAP}", digests)
        image = wait_active(bench, image_id)
    if (image["os_hash_value"], image["checksum"]) != (digests["sha512"], digests["md5"]):
        raise BenchError(f"image {image_id} has other hashes than the ones given")
    return image_id


def run_manual(bench: Bench, n: int) -> Outcome:
    name = f"bench-manual-{n}-{uuid.uuid4().hex[:6]}"
    steps = Steps()
    with ExitStack() as cleanup:
        offset = bench.log_offset()
        start = time.monotonic()
        manual_sequence(bench, name, steps, cleanup)
        seconds = time.monotonic() - start
        traffic = bench.traffic_since(offset)
    return Outcome(seconds, steps.seconds, traffic)


def source_layout(bench: Bench) -> tuple[int, int]:
    import rbd

    with rbd.Image(bench.ioctx, bench.source_id, snapshot=SNAP, read_only=True) as img:
        return int(img.features()), int(img.stat()["order"])


def librbd_copy(bench: Bench, dest: str) -> None:
    import rbd

    with rbd.Image(bench.ioctx, bench.source_id, snapshot=SNAP, read_only=True) as img:
        img.copy(bench.ioctx, dest, features=int(img.features()), order=int(img.stat()["order"]))


def clone_and_flatten(bench: Bench, dest: str) -> None:
    import rbd

    features, order = source_layout(bench)
    rbd.RBD().clone(
        bench.ioctx, bench.source_id, SNAP, bench.ioctx, dest, features=features, order=order
    )
    with rbd.Image(bench.ioctx, dest) as img:
        img.flatten()


def check_flat_copy(bench: Bench, dest: str) -> None:
    """`dest` has the source's size and no parent: a finished, independent copy."""
    import rbd

    with rbd.Image(bench.ioctx, dest, read_only=True) as img:
        if int(img.size()) != bench.source_size:
            raise BenchError(f"{dest} has {img.size()} bytes, not {bench.source_size}")
        try:
            parent = img.get_parent_image_spec()
        except rbd.ImageNotFound:
            return
    raise BenchError(f"{dest} still has a parent: {parent}")


def rbd_method(make: Callable[[Bench, str], None]) -> Callable[[Bench, int], Outcome]:
    """Time `make(bench, DEST)` alone; check DEST, then remove it."""

    def timed(bench: Bench, n: int) -> Outcome:
        import rbd

        dest = f"bench-{make.__name__.replace('_', '-')}-{n}-{uuid.uuid4().hex[:6]}"
        try:
            start = time.monotonic()
            make(bench, dest)
            seconds = time.monotonic() - start
            check_flat_copy(bench, dest)
        finally:
            if dest in rbd.RBD().list(bench.ioctx):
                rbd.RBD().remove(bench.ioctx, dest)
        return Outcome(seconds)

    return timed


RUNNERS: dict[str, Callable[[Bench, int], Outcome]] = {
    CAREEN: run_careen,
    MANUAL: run_manual,
    COPY: rbd_method(librbd_copy),
    CLONE: rbd_method(clone_and_flatten),
}


def run_rounds(bench: Bench, rounds: int) -> dict[str, list[Outcome]]:
    results: dict[str, list[Outcome]] = {method: [] for method in METHODS}
    for n in range(rounds):
        order = METHODS if n % 2 == 0 else tuple(reversed(METHODS))
        for method in order:
            before = bench.pool_images()
            outcome = RUNNERS[method](bench, n)
            after = bench.pool_images()
            if sorted(after) != sorted(before):
                raise BenchError(f"{method} left the pool changed: {before} -> {after}")
            results[method].append(outcome)
            progress(f"round {n + 1}/{rounds}: {method} {outcome.seconds:.2f} s")
    return results


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def step_medians(outcomes: Sequence[Outcome]) -> dict[str, float]:
    names: list[str] = []
    for o in outcomes:
        names += [name for name in o.steps if name not in names]
    return {name: median([o.steps[name] for o in outcomes if name in o.steps]) for name in names}


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            [
                row[0].ljust(widths[0]),
                *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
            ]
        )
        for row in rows
    ]


def main_table(results: dict[str, list[Outcome]]) -> list[str]:
    rows = [["method", "median s", "runs (s, in round order)"]]
    for method in METHODS:
        runs = [o.seconds for o in results[method]]
        rows.append([method, f"{median(runs):.2f}", " ".join(f"{s:.2f}" for s in runs)])
    return table(rows)


def steps_table(title: str, outcomes: Sequence[Outcome]) -> list[str]:
    rows = [[title, "median s"]]
    rows += [[name, f"{s:.2f}"] for name, s in step_medians(outcomes).items()]
    return table(rows)


def traffic_lines(label: str, outcomes: Sequence[Outcome]) -> list[str]:
    lines = []
    for n, o in enumerate(outcomes, 1):
        t = o.traffic
        assert t is not None
        lines.append(
            f"  {label} round {n}: {len(t.requests)} requests, {t.bytes} bytes "
            f"(responses + request Content-Length), {t.data_requests} to /file or /stage"
        )
    first = outcomes[0].traffic
    if first is not None:
        lines.append(f"  {label} round 1 requests: {first.kinds()}")
    return lines


def report(bench: Bench, rounds: int, results: dict[str, list[Outcome]], facts: str) -> str:
    med = {method: median([o.seconds for o in results[method]]) for method in METHODS}
    careen_runs = results[CAREEN]
    return "\n".join(
        [
            f"careen in-cluster RBD refit benchmark: MBR sample ({bench.source_size >> 20} MiB "
            f"virtual, raw, in RBD through Glance), recipe {RECIPE}, {rounds} rounds",
            facts,
            "",
            *main_table(results),
            "",
            f"careen/manual {med[CAREEN] / med[MANUAL]:.2f}x; "
            f"clone+flatten/copy {med[CLONE] / med[COPY]:.2f}x",
            "",
            "Glance API traffic (gunicorn access log):",
            *traffic_lines("careen", careen_runs),
            *traffic_lines("manual", results[MANUAL]),
            "",
            "careen's own figures (glance.figures.seconds), per round:",
            *(
                f"  round {n}: {json.dumps(o.steps)} copied_bytes={o.copied_bytes}"
                for n, o in enumerate(careen_runs, 1)
            ),
            "",
            *steps_table("careen figures", careen_runs),
            "",
            *steps_table("manual steps", results[MANUAL]),
        ]
    )


def version_of(argv: Sequence[str]) -> str:
    try:
        out = run(argv, timeout=30)
    except (OSError, BenchError):
        return "unknown"
    lines = out.strip().splitlines()
    return lines[0] if lines else "unknown"


def machine_facts() -> str:
    return (
        f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
        f"kernel {platform.release()}; {version_of(['ceph', '--version'])}; "
        f"{version_of(['qemu-storage-daemon', '--version'])}"
    )


def check_machine() -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root: losetup, mount and careen refit need it")
    if missing := missing_binaries():
        raise BenchError(f"no Ceph here (missing {', '.join(missing)}): scripts/setup --tests")
    for tool in ("qemu-storage-daemon", "losetup", "sfdisk"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    try:
        service_venv("keystone")
        service_venv("glance")
    except NotInstalled as e:
        raise BenchError(str(e)) from e


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each method (default 3)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        check_machine()
        sample = sample_image(Layout.MBR)
        facts = machine_facts()
        root = Path(tempfile.mkdtemp(prefix="careen-bench-rbd-"))
        progress(f"everything under {root}")
        try:
            with services(root) as bench:
                upload_source(bench, sample)
                results = run_rounds(bench, args.rounds)
                text = report(bench, args.rounds, results, facts)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    except (BenchError, NotInstalled, subprocess.TimeoutExpired) as e:
        print(f"benchmark: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmark: interrupted; everything was stopped", file=sys.stderr)
        return 130
    print(text)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
