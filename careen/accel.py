"""Which CPU acceleration a VM that careen starts can use: KVM, or TCG emulation.

`/dev/kvm` existing is not proof that KVM works: under nested virtualisation qemu may
abort on an unsupported MSR, or the guest may hang right after the firmware. So `AUTO`
boots a kernel for a moment with `accel=kvm` and a deadline, and trusts KVM only when
the kernel's first console lines appear. The answer is cached in careen's state
directory, keyed by what could change it (the host kernel, qemu's version, the boot),
so the probe costs a few seconds once per boot, not once per run.

This module knows nothing about libguestfs beyond the backend settings it hands out:
anything that starts a VM (the appliance, a boot check) asks it the same question.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from careen import journal, run

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT = 20.0
# A kernel prints this (or its banner) within the first console lines of any boot.
_BOOTED_MARKERS = ("Linux version", "Command line:")
_KERNEL_PATTERNS = (
    "/boot/vmlinuz-*",
    "/var/tmp/.guestfs-*/appliance.d/kernel",
)


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class Verdict:
    accel: Accel
    reason: str


def host_key() -> str:
    """What the cached answer depends on: kernel release, qemu's version, this boot."""
    return f"{os.uname().release}|{qemu_version()}|{journal.boot_id()}"


def qemu_version() -> str:
    try:
        out = run.run([QEMU, "--version"], timeout=10).stdout
    except run.CommandError:
        return "none"
    first = out.splitlines()[0] if out.strip() else "unknown"
    return first.strip()


def cache_path() -> Path:
    return journal.state_dir() / "accel.json"


def read_cache(key: str, path: Path | None = None) -> Verdict | None:
    try:
        data = json.loads((path or cache_path()).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    try:
        return Verdict(Accel(data["accel"]), str(data.get("reason", "")))
    except (KeyError, ValueError):
        return None


def write_cache(key: str, verdict: Verdict, path: Path | None = None) -> None:
    target = path or cache_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "accel": verdict.accel, "reason": verdict.reason}))
        tmp.replace(target)
    except OSError as e:
        # A cache that cannot be written only costs a probe next time.
        log.debug("cannot cache the acceleration probe in %s: %s", target, e)


def find_kernel() -> Path | None:
    """A readable kernel to probe with: the host's own, or libguestfs's appliance kernel."""
    for pattern in _KERNEL_PATTERNS:
        for candidate in sorted(glob.glob(pattern), reverse=True):
            if os.access(candidate, os.R_OK):
                return Path(candidate)
    return None


def probe_argv(kernel: Path) -> list[str]:
    return [
        QEMU,
        "-machine",
        "accel=kvm",
        "-cpu",
        "host",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
        "-m",
        "256",
        "-kernel",
        str(kernel),
        "-append",
        "console=ttyS0 panic=-1 earlyprintk=ttyS0",
    ]


def probe_kvm(timeout: float = PROBE_TIMEOUT) -> Verdict:
    """Boot a kernel briefly under KVM; KVM only when its console speaks in time."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Verdict(Accel.TCG, "/dev/kvm is missing or not accessible to this user")
    kernel = find_kernel()
    if kernel is None:
        return Verdict(Accel.TCG, "no readable kernel to test KVM with")
    try:
        # The probe kernel has no root disk, so it panics and (with panic=-1 and
        # -no-reboot) qemu exits by itself; the deadline covers a hung guest.
        done = run.run(probe_argv(kernel), timeout=timeout, check=False)
        output = done.stdout + done.stderr
    except run.CommandError as e:
        output = e.stdout + e.stderr
        if e.returncode == 127:
            return Verdict(Accel.TCG, f"{QEMU} is not installed")
    if any(marker in output for marker in _BOOTED_MARKERS):
        return Verdict(Accel.KVM, f"a test boot of {kernel.name} under KVM reached its console")
    tail = " | ".join(line.strip() for line in output.strip().splitlines()[-2:])
    return Verdict(
        Accel.TCG,
        f"a test boot under KVM did not reach the kernel's console in {timeout:.0f} s"
        + (f" ({tail})" if tail else ""),
    )


def resolve(requested: Accel) -> Accel:
    """KVM or TCG: what was asked for, or for AUTO the (cached) result of a test boot."""
    if requested is not Accel.AUTO:
        log.info("CPU acceleration: %s (asked for)", requested)
        return requested
    key = host_key()
    verdict = read_cache(key)
    if verdict is not None:
        log.info("CPU acceleration: %s (%s; cached for this boot)", verdict.accel, verdict.reason)
        return verdict.accel
    verdict = probe_kvm()
    write_cache(key, verdict)
    level = logging.INFO if verdict.accel is Accel.KVM else logging.WARNING
    log.log(level, "CPU acceleration: %s (%s)", verdict.accel, verdict.reason)
    return verdict.accel


def guestfs_settings(accel: Accel) -> list[str]:
    """libguestfs backend settings for an accelerator resolved by `resolve()`."""
    if accel is Accel.AUTO:
        raise ValueError("resolve() the accelerator first")
    # libguestfs itself tries KVM and falls back only when qemu refuses it, which is
    # not enough where KVM is present but broken; forcing TCG avoids that.
    return ["force_tcg"] if accel is Accel.TCG else []


def qemu_options(accel: Accel) -> list[str]:
    """qemu-system arguments for an accelerator resolved by `resolve()`."""
    if accel is Accel.AUTO:
        raise ValueError("resolve() the accelerator first")
    # Under KVM the guest sees the host's CPU; under TCG qemu's default model boots
    # every x86-64 distribution and costs less to emulate than "max".
    return ["-accel", "kvm", "-cpu", "host"] if accel is Accel.KVM else ["-accel", "tcg"]
