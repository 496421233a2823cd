"""Benchmark careen's two backends against virt-customize and against a plain qemu-img copy.

What is measured: the wall time of one whole command, from start to exit, on the
mbr-qcow2 sample (a used Debian 12 whose apt sources point only at a repository inside
the guest, so nothing needs the network). Each operation is timed in three columns:
careen with the host backend (`--backend host`: loop devices, no VM), careen with the
appliance backend (`--backend appliance`: a libguestfs VM, like virt-customize), and a
baseline tool.

1. refit: reset cloud-init state, clean the apt cache, install `tree`, in that order.
   - careen: `careen -q refit COPY -o OUT --reset-cloud-init --clean-caches --install tree
     --backend B` (writes a new qcow2), and the same with `--in-place` instead of `-o OUT`;
   - baseline virt-customize, which always works in place: `--run-command 'cloud-init
     clean --logs'`, `--delete` of the paths careen's reset removes besides (the instance
     link and the network identity of the first server), `--run-command` for `apt-get
     clean` and the package lists careen's clean removes, and `--install tree`, which runs
     the guest's own `apt-get update` and `apt-get install` against its file: repository.
     `--no-network` is explicit: the repository is inside the guest, careen's host backend
     works offline too, and the appliance boots faster without a network. careen's
     appliance cannot be told so: a recipe that installs gets the appliance's network
     (checked before anything changes), which the comparison therefore includes.
2. floor: careen with the built-in `empty` recipe (open, change nothing, write a new
   qcow2) against the baseline `qemu-img convert -O qcow2` of the same image followed by an
   fsync of the result. careen syncs its output before it exits, and qemu-img's convert
   does not sync the data by default, so the fsync is part of the timed floor. Through
   the appliance, this is the cost of a launch plus the copy.

How: every single run gets its own fresh copy of the cached sample in a temporary
directory under `${CAREEN_CACHE:-~/.cache/careen}/bench/` (the cache's disk, so a copy is
a local file copy), flushed to disk before the clock starts; copying is not timed. The
runs alternate between the tools within each round, and every other round runs them in
reverse order, so neither tool always follows the other. A run counts only if it exited
0 and left a result (careen's and qemu-img's output exists; an in-place image was
written), otherwise the benchmark stops with the command's error. Each figure is the
median over the rounds; ratios are of medians.

virt-customize and careen's appliance start a libguestfs appliance: with
`LIBGUESTFS_BACKEND` and `LIBGUESTFS_BACKEND_SETTINGS` unset, this script uses the direct
backend with TCG (`force_tcg`) for virt-customize and `--accel tcg` for careen, as nested
KVM cannot boot a kernel on the machines careen is developed on. On a host where KVM
works, set `LIBGUESTFS_BACKEND_SETTINGS=` (empty) to let libguestfs use it (careen then
gets `--accel auto`); the machine line says which was used. Both appliances keep
libguestfs's default CPUs and memory. careen's host backend and qemu-img start no VM.

Run as root: `python scripts/benchmark.py [--rounds N] [--json]`. Progress goes to
stderr; the results go to stdout, as text or (with `--json`) as one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from careen import __version__ as careen_version
from careen.guest.ops import NETWORK_IDENTITY
from careen.samples import Layout, cache_dir, sample_image

PACKAGE = "tree"
RUN_TIMEOUT = 1800.0  # seconds; a TCG virt-customize run takes well under a minute

# careen's --clean-caches runs `apt-get clean` and empties /var/lib/apt/lists except
# its lock and partial/ directory; this does the same inside the guest.
_APT_CLEAN = (
    "apt-get clean && "
    "find /var/lib/apt/lists -mindepth 1 -maxdepth 1 ! -name lock ! -name partial -delete"
)


class BenchError(Exception):
    """A run failed or the machine cannot run the benchmark."""


class Column(StrEnum):
    """Who does the work: a column of the results table."""

    HOST = "careen host"
    APPLIANCE = "careen appliance"
    BASELINE = "baseline"


@dataclass(frozen=True)
class Case:
    """One way of doing the work: a command line built from the fresh copy and an output."""

    key: str
    operation: str  # the row of the results table
    column: Column
    argv: Callable[[Path, Path], list[str]]
    in_place: bool
    sync_output: bool = False


def careen_bin() -> str:
    beside = Path(sys.executable).parent / "careen"
    if beside.is_file():
        return os.fspath(beside)
    found = shutil.which("careen")
    if found is None:
        raise BenchError("careen is not installed beside this Python nor on PATH")
    return found


REFIT_OPS = ["--reset-cloud-init", "--clean-caches", "--install", PACKAGE]


def host_backend() -> list[str]:
    return ["--backend", "host"]


def appliance_backend() -> list[str]:
    """careen's appliance, accelerated the way virt-customize's is (see libguestfs_env)."""
    settings = libguestfs_env()["LIBGUESTFS_BACKEND_SETTINGS"].split(":")
    return ["--backend", "appliance", "--accel", "tcg" if "force_tcg" in settings else "auto"]


def careen_refit(backend: Callable[[], list[str]]) -> Callable[[Path, Path], list[str]]:
    def argv(image: Path, out: Path) -> list[str]:
        dest = ["-o", os.fspath(out)]
        return [careen_bin(), "-q", "refit", os.fspath(image), *dest, *REFIT_OPS, *backend()]

    return argv


def careen_refit_in_place(backend: Callable[[], list[str]]) -> Callable[[Path, Path], list[str]]:
    def argv(image: Path, _out: Path) -> list[str]:
        where = [os.fspath(image), "--in-place"]
        return [careen_bin(), "-q", "refit", *where, *REFIT_OPS, *backend()]

    return argv


def careen_empty(backend: Callable[[], list[str]]) -> Callable[[Path, Path], list[str]]:
    def argv(image: Path, out: Path) -> list[str]:
        dest = ["-o", os.fspath(out)]
        return [careen_bin(), "-q", "refit", os.fspath(image), *dest, "-r", "empty", *backend()]

    return argv


def virt_customize(image: Path, _out: Path) -> list[str]:
    deletes = ["/var/lib/cloud/instance", *NETWORK_IDENTITY]
    return [
        "virt-customize",
        "-q",
        "--no-network",
        "--format",
        "qcow2",
        "-a",
        os.fspath(image),
        "--run-command",
        "cloud-init clean --logs",
        *(arg for path in deletes for arg in ("--delete", path)),
        "--run-command",
        _APT_CLEAN,
        "--install",
        PACKAGE,
    ]


def qemu_img_convert(image: Path, out: Path) -> list[str]:
    return ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", os.fspath(image), os.fspath(out)]


REFIT = f"refit (reset cloud-init, clean apt cache, install {PACKAGE}) to a new qcow2"
REFIT_IN_PLACE = "the same refit in place"
FLOOR = "floor: copy only (careen -r empty; qemu-img convert -O qcow2 + fsync)"
OPERATIONS = (REFIT, REFIT_IN_PLACE, FLOOR)

CASES = (
    Case("careen", REFIT, Column.HOST, careen_refit(host_backend), in_place=False),
    Case(
        "careen-appliance",
        REFIT,
        Column.APPLIANCE,
        careen_refit(appliance_backend),
        in_place=False,
    ),
    Case(
        "careen-in-place",
        REFIT_IN_PLACE,
        Column.HOST,
        careen_refit_in_place(host_backend),
        in_place=True,
    ),
    Case(
        "careen-appliance-in-place",
        REFIT_IN_PLACE,
        Column.APPLIANCE,
        careen_refit_in_place(appliance_backend),
        in_place=True,
    ),
    Case("virt-customize", REFIT_IN_PLACE, Column.BASELINE, virt_customize, in_place=True),
    Case("careen-empty", FLOOR, Column.HOST, careen_empty(host_backend), in_place=False),
    Case(
        "careen-appliance-empty",
        FLOOR,
        Column.APPLIANCE,
        careen_empty(appliance_backend),
        in_place=False,
    ),
    Case(
        "qemu-img-convert",
        FLOOR,
        Column.BASELINE,
        qemu_img_convert,
        in_place=False,
        sync_output=True,
    ),
)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_copy(sample: Path, dest: Path) -> None:
    """Copy the sample and flush it, so its write-back does not land inside a timed run."""
    shutil.copyfile(sample, dest)
    fsync(dest)


def tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def verify(
    case: Case, proc: subprocess.CompletedProcess[str], image: Path, out: Path, mtime_before: int
) -> None:
    """Refuse a run that did not do its work, so it is never timed as a fast one."""
    if proc.returncode != 0:
        raise BenchError(
            f"{case.key} exited {proc.returncode}: {' '.join(proc.args)}\n{tail(proc.stderr)}"
        )
    if case.in_place:
        if not image.is_file() or image.stat().st_mtime_ns == mtime_before:
            raise BenchError(f"{case.key} exited 0 but did not write {image}")
    elif not out.is_file() or out.stat().st_size == 0:
        raise BenchError(f"{case.key} exited 0 but wrote no {out}")


def run_once(case: Case, sample: Path, bench: Path, env: dict[str, str]) -> float:
    """Time one run of `case` on its own fresh copy of the sample, in seconds."""
    with tempfile.TemporaryDirectory(dir=bench, prefix=f"{case.key}-") as tmp:
        image, out = Path(tmp) / "image.qcow2", Path(tmp) / "out.qcow2"
        fresh_copy(sample, image)
        mtime_before = image.stat().st_mtime_ns
        argv = case.argv(image, out)
        start = time.monotonic()
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        if case.sync_output and proc.returncode == 0 and out.is_file():
            fsync(out)
        elapsed = time.monotonic() - start
        verify(case, proc, image, out, mtime_before)
        return elapsed


def libguestfs_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("LIBGUESTFS_BACKEND", "direct")
    env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    return env


def first_line(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    lines = proc.stdout.strip().splitlines()
    return lines[0] if lines else "unknown"


def version_of(argv: Sequence[str], word: int) -> str:
    words = first_line(argv).split()
    return words[word] if len(words) > word else "unknown"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    return 0.0


def acceleration(env: dict[str, str]) -> str:
    """What libguestfs's qemu uses: forced TCG, or KVM when /dev/kvm is usable."""
    settings = env.get("LIBGUESTFS_BACKEND_SETTINGS", "")
    if "force_tcg" in settings.split(":"):
        return "TCG (LIBGUESTFS_BACKEND_SETTINGS=force_tcg)"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "KVM (/dev/kvm usable; libguestfs falls back to TCG if it fails)"
    return "TCG (no usable /dev/kvm)"


def machine_facts(env: dict[str, str]) -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "memory_gib": round(memory_gib(), 1),
        "kernel": platform.release(),
        # The machine may be shared; a busy one makes every figure slower and noisier.
        "load_average_1m": round(os.getloadavg()[0], 2),
        "qemu": version_of(["qemu-system-x86_64", "--version"], 3),
        "qemu_img": version_of(["qemu-img", "--version"], 2),
        "libguestfs": version_of(["guestfish", "--version"], 1),
        "guestfs_tools": version_of(["virt-customize", "--version"], 1),
        "libguestfs_backend": env.get("LIBGUESTFS_BACKEND", ""),
        "acceleration": acceleration(env),
        "careen": careen_version,
    }


def check_machine() -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root: careen refit needs root on the host")
    for tool in ("virt-customize", "qemu-img"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (Debian: guestfs-tools, qemu-utils)")


def run_rounds(
    rounds: int, sample: Path, bench: Path, env: dict[str, str]
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {case.key: [] for case in CASES}
    for n in range(rounds):
        order = CASES if n % 2 == 0 else tuple(reversed(CASES))
        for case in order:
            seconds = run_once(case, sample, bench, env)
            times[case.key].append(seconds)
            print(f"round {n + 1}/{rounds}: {case.key} {seconds:.2f} s", file=sys.stderr)
    return times


@dataclass(frozen=True)
class Summary:
    """The timings of every run, their medians, and the ratios of the medians."""

    seconds: dict[str, list[float]]
    median_seconds: dict[str, float]
    ratios: dict[str, float]


# Each ratio is of medians: (numerator, denominator) case keys.
RATIOS = {
    "virt-customize/careen": ("virt-customize", "careen"),
    "virt-customize/careen-in-place": ("virt-customize", "careen-in-place"),
    "virt-customize/careen-appliance-in-place": ("virt-customize", "careen-appliance-in-place"),
    "careen-appliance/careen": ("careen-appliance", "careen"),
    "careen-empty/qemu-img-convert": ("careen-empty", "qemu-img-convert"),
    "careen-appliance-empty/qemu-img-convert": ("careen-appliance-empty", "qemu-img-convert"),
}
BASELINE_NAMES = {"virt-customize": "virt-customize", "qemu-img-convert": "qemu-img convert"}


def summarize(times: dict[str, list[float]]) -> Summary:
    med = {key: statistics.median(values) for key, values in times.items()}
    ratios = {name: med[num] / med[den] for name, (num, den) in RATIOS.items()}
    return Summary(times, med, ratios)


def results_table(med: dict[str, float]) -> list[str]:
    """One row per operation, one column per backend and the baseline."""
    rows = [["operation", *(str(column) for column in Column)]]
    for operation in OPERATIONS:
        cells = {column: "-" for column in Column}
        for case in CASES:
            if case.operation == operation:
                name = BASELINE_NAMES.get(case.key, "")
                cells[case.column] = f"{name} {med[case.key]:.2f} s".strip()
        rows.append([operation, *(cells[column] for column in Column)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        padded = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join([row[0].ljust(widths[0]), *padded[1:]]))
    return lines


def report_text(sample: Path, rounds: int, facts: dict[str, object], summary: Summary) -> str:
    med, ratio = summary.median_seconds, summary.ratios
    size = sample.stat().st_size / (1 << 20)
    backend = facts["libguestfs_backend"] or "default"
    return "\n".join(
        [
            f"careen benchmark: the {Layout.MBR_QCOW2} sample (Debian 12, {size:.0f} MiB qcow2), "
            f"{rounds} rounds, median wall time",
            f"machine: {facts['cores']} cores ({facts['cpu']}), {facts['memory_gib']} GiB, "
            f"load {facts['load_average_1m']} at start; "
            f"qemu {facts['qemu']}; libguestfs {facts['libguestfs']} "
            f"(guestfs-tools {facts['guestfs_tools']}); careen {facts['careen']}",
            f"virt-customize and careen's appliance: {backend} backend, "
            f"{facts['acceleration']}; careen's host backend and qemu-img start no VM",
            "",
            *results_table(med),
            "",
            f"virt-customize/careen host {ratio['virt-customize/careen']:.2f}x "
            f"(in place {ratio['virt-customize/careen-in-place']:.2f}x); "
            "virt-customize/careen appliance, both in place "
            f"{ratio['virt-customize/careen-appliance-in-place']:.2f}x; "
            f"careen appliance/host {ratio['careen-appliance/careen']:.2f}x",
            f"floor: careen host/qemu-img {ratio['careen-empty/qemu-img-convert']:.2f}x, "
            f"careen appliance/qemu-img {ratio['careen-appliance-empty/qemu-img-convert']:.2f}x",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tool (default 3)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        check_machine()
        env = libguestfs_env()
        sample = sample_image(Layout.MBR_QCOW2)
        bench = cache_dir().parent / "bench"
        bench.mkdir(parents=True, exist_ok=True)
        try:
            facts = machine_facts(env)
            times = run_rounds(args.rounds, sample, bench, env)
        finally:
            # Another run may be using the directory too; it goes once it is empty.
            with contextlib.suppress(OSError):
                bench.rmdir()
    except (BenchError, subprocess.TimeoutExpired) as e:
        print(f"benchmark: {e}", file=sys.stderr)
        return 1
    summary = summarize(times)
    total = time.monotonic() - started
    if args.json:
        doc = {
            "sample": os.fspath(sample),
            "rounds": args.rounds,
            "machine": facts,
            **asdict(summary),
            "total_seconds": total,
        }
        print(json.dumps(doc, indent=2))
    else:
        print(report_text(sample, args.rounds, facts, summary))
        print(f"whole benchmark, fresh copies included: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
