"""`careen verify`: boot an image on a throwaway overlay and watch cloud-init set it up.

    probe_image -> inspect_guest (Windows? a kernel? cloud-init's default user?)
      -> resolve acceleration -> key pair, metadata, seed ISO -> overlay
      -> boot (serial console on a socket) -> run_stages -> stop the VM
      -> keep the serial log when something failed -> remove everything else

Nothing is started before the image has shown that it has a kernel and cloud-init. The
image is opened read-only under a qcow2 overlay and is never written. The work
directory (overlay, key pair, metadata, serial socket and log) is journaled and removed
at the end; the qemu process is journaled as a daemon, so `careen cleanup` stops one a
killed run left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from careen import accel, journal, locks, run
from careen.attach import export
from careen.cleanup import Resources
from careen.errors import CareenError, UsageError
from careen.image import probe
from careen.refit import ApplianceOptions, Backend, workdir
from careen.verify import boot, guestcheck, seed, stages
from careen.verify.console import Console

log = logging.getLogger(__name__)

DEFAULT_STAGE_TIMEOUT = 300.0  # seconds; a boot under TCG on a busy host takes minutes


@dataclass(frozen=True)
class VerifyOptions:
    image: Path
    datasource: seed.Datasource = seed.Datasource.NOCLOUD
    boot: boot.BootProperties = field(default_factory=boot.BootProperties)
    accel: accel.Accel = accel.Accel.AUTO
    memsize: int = 1024  # MiB
    smp: int = 2
    stage_timeout: float = DEFAULT_STAGE_TIMEOUT
    user: str | None = None  # the default user; read from the image's cloud.cfg if None
    serial_log: Path | None = None  # keep the serial log here, pass or fail
    workdir: Path | None = None  # where the overlay and the seed go
    backend: Backend = Backend.AUTO  # who reads the image's files before the boot


@dataclass
class VerifyResult:
    image: Path
    datasource: seed.Datasource
    boot: boot.BootProperties
    accelerator: accel.Accel
    user: str
    hostname: str
    instance_id: str
    stages: list[stages.StageResult]
    seconds: float
    serial_log: Path | None = None

    @property
    def passed(self) -> bool:
        return all(s.outcome is stages.Outcome.PASS for s in self.stages)

    @property
    def failed(self) -> list[str]:
        return [s.stage.value for s in self.stages if s.outcome is not stages.Outcome.PASS]

    def summary(self) -> str:
        verdict = "passed" if self.passed else f"failed at {', '.join(self.failed)}"
        return (
            f"boot verification {verdict} ({self.accelerator.upper()}, {self.datasource}, "
            f"{self.seconds:.0f} s)"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "image": str(self.image),
            "passed": self.passed,
            "datasource": str(self.datasource),
            "firmware": str(self.boot.firmware),
            "disk_bus": str(self.boot.disk_bus),
            "machine": str(self.boot.machine),
            "accel": str(self.accelerator),
            "user": self.user,
            "hostname": self.hostname,
            "instance_id": self.instance_id,
            "seconds": round(self.seconds, 1),
            "serial_log": str(self.serial_log) if self.serial_log else None,
            "stages": [
                {
                    "stage": str(s.stage),
                    "result": str(s.outcome),
                    "seconds": round(s.seconds, 1),
                    "detail": s.detail,
                }
                for s in self.stages
            ],
        }


class VerifyFailed(CareenError):
    """A boot verification ran and some stage did not pass."""

    def __init__(self, result: VerifyResult, message: str) -> None:
        hint = f"the serial log is in {result.serial_log}" if result.serial_log else ""
        super().__init__(message, hint)
        self.result = result


def check_options(opts: VerifyOptions) -> None:
    """Refuse impossible settings before anything is read or started."""
    opts.boot.check()
    if opts.boot.firmware is boot.Firmware.UEFI:
        boot.find_ovmf()
    if opts.memsize < 256 or opts.smp < 1:
        raise UsageError(
            "give the test VM at least 256 MiB and one CPU (--memsize, --smp)",
            hint="leave both out for the defaults (--memsize 1024 --smp 2)",
        )
    for program, package in (("ssh", "openssh-client"), ("ssh-keygen", "openssh-client")):
        if not run.have(program):
            raise CareenError(
                f"boot verification needs {program}", hint=f"apt-get install {package}"
            )


def verify_image(opts: VerifyOptions) -> VerifyResult:
    """Boot `opts.image` once and check every stage; the image itself is never written."""
    check_options(opts)
    info = probe.probe_image(opts.image)
    with Resources() as res:
        res.enter_context(locks.hold(locks.source_key(info.path), f"the image {info.path}"))
        facts = guestcheck.inspect_guest(
            info,
            user=opts.user,
            backend=opts.backend,
            options=ApplianceOptions(opts.accel, opts.smp, opts.memsize),
            parent=opts.workdir,
        )
        log.info(
            "Guest: %s, cloud-init %s, default user %s",
            facts.pretty_name,
            facts.cloud_init,
            facts.default_user,
        )
        accelerator = accel.resolve(opts.accel)  # only now: the KVM probe starts a qemu
        work = res.enter_context(
            workdir(opts.workdir, prefix="careen-verify-", what="verify work directory", clear=True)
        )
        key = seed.make_key(work)
        md = seed.new_metadata(facts.default_user, key.public)
        overlay = res.enter_context(export.overlay(info, work / "disk.qcow2"))
        iso = seed.make_seed(opts.datasource, md, work)
        config = _vm_config(opts, accelerator, work, overlay, iso)
        started = time.monotonic()
        results = _boot_and_check(config, md, key, opts)
        result = VerifyResult(
            info.path,
            opts.datasource,
            opts.boot,
            accelerator,
            md.user,
            md.hostname,
            md.instance_id,
            results,
            time.monotonic() - started,
        )
        result.serial_log = _keep_log(work / "serial.log", opts.serial_log, result.passed)
    return result


def _vm_config(
    opts: VerifyOptions, accelerator: accel.Accel, work: Path, overlay: Path, seed_iso: Path
) -> boot.VMConfig:
    uefi = opts.boot.firmware is boot.Firmware.UEFI
    return boot.VMConfig(
        overlay=overlay,
        seed=seed_iso,
        serial_socket=work / "serial.sock",
        ssh_port=boot.free_port(),
        accelerator=accelerator,
        boot=opts.boot,
        memsize=opts.memsize,
        smp=opts.smp,
        firmware_vars=boot.private_firmware_vars(work) if uefi else None,
    )


def _boot_and_check(
    config: boot.VMConfig, md: seed.Metadata, key: seed.KeyPair, opts: VerifyOptions
) -> list[stages.StageResult]:
    """Boot, follow the console into `serial.log` beside the overlay, run every stage."""
    log_path = config.overlay.parent / "serial.log"
    with log_path.open("wb") as serial_log, boot.running(config) as vm:
        console = Console(vm.serial, serial_log, alive=vm.alive)
        session = stages.Session(console, md, key, config.ssh_port, opts.stage_timeout)
        return stages.run_stages(session)


def _keep_log(log_path: Path, wanted: Path | None, passed: bool) -> Path | None:
    """Copy the serial log out of the work directory when asked or when a stage failed."""
    if wanted is None and passed:
        return None
    target = wanted or _failure_log_path()
    try:
        shutil.copyfile(log_path, target)
    except OSError as e:
        log.error("could not save the serial log to %s: %s", target, e.strerror)
        return None
    return target.absolute()


def _failure_log_path() -> Path:
    run_id = journal.current_run_id() or f"{os.getpid()}"
    return Path(tempfile.gettempdir()) / f"verify-{run_id}.serial.log"
