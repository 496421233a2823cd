"""The used Debian 12 root that every sample image is made from.

`build_root()` bootstraps bookworm with mmdebstrap, runs the guest's own cloud-init once
from a NoCloud seed so the root carries what a booted cloud instance leaves behind
(instance data, semaphores, logs, SSH host keys, a user), and adds a local apt
repository at /srv/careen-repo that offers a newer cloud-init, qemu-guest-agent with the
dependencies the root lacks, and `tree`. The guest's apt sources name only that
repository, so refitting a sample upgrades and installs packages without a network.

`build_selinux_root()` makes a variant of that root with Debian's SELinux policy and
tools installed from the mirror, SELinux enforcing in /etc/selinux/config, and every
file labelled by the guest's own `setfiles`, as a guest that has booted with SELinux is.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from careen.errors import CareenError
from careen.log import step
from careen.run import Arg, run
from careen.samples.devices import GUEST_ENV, in_guest

log = logging.getLogger(__name__)

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# python3-cffi-backend is named because debootstrap-style resolvers miss it for
# cloud-init's cryptography; naming it costs nothing with mmdebstrap.
PACKAGES = (
    "systemd-sysv",
    "cloud-init",
    "openssh-server",
    "sudo",
    "ifupdown",
    "isc-dhcp-client",
    "netbase",
    "iproute2",
    "ca-certificates",
    "python3-cffi-backend",
)
REPO_EXTRAS = ("qemu-guest-agent", "tree")
REPO_DIR = "srv/careen-repo"
SOURCES_LIST = "deb [trusted=yes] file:/srv/careen-repo ./\n"
VERSION_SUFFIX = "+careen1"

INSTANCE_ID = "iid-careen-sample-1"
INSTANCE_DIR = f"var/lib/cloud/instances/{INSTANCE_ID}"
HOSTNAME = "sample-guest"
USER = "sample"
PASSWORD = "sample-password"
RESOLV_CONF = "nameserver 192.0.2.53\nsearch sample.invalid\n"

SEED_DIR = "var/lib/cloud/seed/nocloud"
# Sorts after the distribution's datasource settings, so only the seed is consulted.
SEED_CFG = "etc/cloud/cloud.cfg.d/99_careen_seed.cfg"
CLOUD_INIT_STAGES = (
    ("init", "--local"),
    ("init",),
    ("modules", "--mode=config"),
    ("modules", "--mode=final"),
)

SELINUX_PACKAGES = ("selinux-policy-default", "selinux-basics", "policycoreutils", "selinux-utils")
SELINUX_TYPE = "default"
SELINUX_CONFIG = f"SELINUX=enforcing\nSELINUXTYPE={SELINUX_TYPE}\n"
FILE_CONTEXTS = f"/etc/selinux/{SELINUX_TYPE}/contexts/files/file_contexts"
# Scratch space inside the variant root for apt's lists and downloads from the mirror,
# so the guest's own lists and package cache stay those of the local repository.
_APT_SCRATCH = "tmp/careen-selinux-apt"
_POLICY_RC_D = "usr/sbin/policy-rc.d"


def recipe() -> dict[str, object]:
    """Everything that decides what `build_root()` makes; the cache key digests it."""
    return {
        "suite": SUITE,
        "mirror": MIRROR,
        "packages": PACKAGES,
        "repo_extras": REPO_EXTRAS,
        "version_suffix": VERSION_SUFFIX,
        "instance_id": INSTANCE_ID,
        "user_data": _user_data(),
        "resolv_conf": RESOLV_CONF,
    }


def build_root(root: Path, work: Path) -> None:
    """Build the used root into the empty directory `root`; `work` holds scratch files."""
    with step(f"Bootstrapping Debian {SUITE} into {root}"):
        _bootstrap(root, work)
    with step("Running the guest's cloud-init once from a NoCloud seed"):
        _run_cloud_init(root)
    with step(f"Adding the local apt repository /{REPO_DIR}"):
        _make_local_repo(root, work)
        _point_apt_at_repo(root)
    _finish(root)
    verify_root(root)


def _bootstrap(root: Path, work: Path) -> None:
    archives = '"$1"/var/cache/apt/archives'
    keep_cloud_init = f"cp {archives}/cloud-init_*.deb {shlex.quote(str(work))}/"
    # Downloading only what the root lacks gives exactly the .debs the repo needs; they
    # also stay in the apt cache so that cleaning caches later has something to remove.
    download = 'chroot "$1" apt-get install --yes --quiet --download-only ' + " ".join(REPO_EXTRAS)
    run(
        [
            "mmdebstrap",
            "--mode=root",
            "--variant=apt",
            "--skip=cleanup/apt",
            f"--include={','.join(PACKAGES)}",
            f"--customize-hook={keep_cloud_init}",
            '--customize-hook=chroot "$1" apt-get clean',
            f"--customize-hook={download}",
            SUITE,
            root,
            MIRROR,
        ],
        hint=f"mmdebstrap needs root and a reachable {MIRROR}",
    )


def _user_data() -> str:
    return (
        "#cloud-config\n"
        f"hostname: {HOSTNAME}\n"
        "locale: C.UTF-8\n"
        "users:\n"
        f"  - name: {USER}\n"
        f"    plain_text_passwd: {PASSWORD}\n"
        "    lock_passwd: false\n"
        "    shell: /bin/bash\n"
        "    sudo: ALL=(ALL) NOPASSWD:ALL\n"
    )


def _run_cloud_init(root: Path) -> None:
    seed = root / SEED_DIR
    seed.mkdir(parents=True)
    (seed / "meta-data").write_text(f"instance-id: {INSTANCE_ID}\nlocal-hostname: {HOSTNAME}\n")
    (seed / "user-data").write_text(_user_data())
    (root / SEED_CFG).write_text("datasource_list: [NoCloud, None]\n")
    # Stages that want a network fail in the empty network namespace; what matters is
    # what they leave behind, which verify_root() checks.
    for stage in CLOUD_INIT_STAGES:
        in_guest(root, ["cloud-init", *stage], check=False)
    shutil.rmtree(seed)
    (root / SEED_CFG).unlink()


def _make_local_repo(root: Path, work: Path) -> None:
    repo = root / REPO_DIR
    repo.mkdir(parents=True)
    _rebuild_newer(_only(work.glob("cloud-init_*.deb")), repo, work / "unpacked")
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        shutil.copy2(deb, repo)
    packages = run(["apt-ftparchive", "packages", "."], cwd=repo).stdout
    (repo / "Packages").write_text(packages)
    release = run(["apt-ftparchive", "release", "."], cwd=repo).stdout
    (repo / "Release").write_text(release)


def _only(paths: Iterable[Path]) -> Path:
    found = list(paths)
    if len(found) != 1:
        raise CareenError(f"expected one cloud-init package from the bootstrap, found {found}")
    return found[0]


def _rebuild_newer(deb: Path, repo: Path, unpacked: Path) -> None:
    """Repack `deb` under a higher version so apt in the guest sees an upgrade."""
    version = run(["dpkg-deb", "--field", deb, "Version"]).stdout.strip()
    newer = version + VERSION_SUFFIX
    run(["dpkg-deb", "--raw-extract", deb, unpacked])
    control = unpacked / "DEBIAN/control"
    text = re.sub(r"(?m)^Version: .*$", f"Version: {newer}", control.read_text())
    control.write_text(text)
    name = f"cloud-init_{newer.split(':')[-1]}_all.deb"
    # gzip instead of xz: the package is rebuilt on every cold build and speed matters.
    run(["dpkg-deb", "-Zgzip", "--build", unpacked, repo / name])
    log.debug("rebuilt cloud-init %s as %s", version, newer)


def _point_apt_at_repo(root: Path) -> None:
    (root / "etc/apt/sources.list").write_text(SOURCES_LIST)
    for entry in (root / "etc/apt/sources.list.d").iterdir():
        entry.unlink()
    # Refreshing the lists inside the guest makes them match the repository, as if the
    # guest had run apt-get update last time it was up.
    in_guest(root, ["apt-get", "update", "--quiet"])


def _finish(root: Path) -> None:
    """Leave what a booted guest has: a machine id and a resolver configuration."""
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text(RESOLV_CONF)
    resolv.chmod(0o644)


def installed_version(root: Path, package: str) -> str:
    """The version of `package` installed in `root`, as the guest's dpkg records it."""
    admin = root / "var/lib/dpkg"
    argv = ["dpkg-query", f"--admindir={admin}", "--show", "--showformat=${Version}", package]
    return run(argv).stdout.strip()


def verify_root(root: Path) -> None:
    """Fail loudly unless `root` carries every trace the sample images promise."""
    problems = [what for what, ok in _root_checks(root) if not ok]
    problems += _apt_problems(root)
    if problems:
        raise CareenError(
            f"the sample root {root} is incomplete: " + "; ".join(problems),
            hint="run with --debug and read the cloud-init and apt output above",
        )


def _root_checks(root: Path) -> list[tuple[str, bool]]:
    cloud = root / "var/lib/cloud"
    instance = cloud / "instance"
    passwd = (root / "etc/passwd").read_text()
    archives = root / "var/cache/apt/archives"
    return [
        ("/var/lib/cloud/instance is no symlink", instance.is_symlink()),
        ("no instance directory", (root / INSTANCE_DIR).is_dir()),
        ("instance link points elsewhere", _link(instance) == f"/{INSTANCE_DIR}"),
        ("no /var/lib/cloud/sem", (cloud / "sem").is_dir()),
        ("no /var/lib/cloud/data", (cloud / "data").is_dir()),
        ("no /var/log/cloud-init.log", (root / "var/log/cloud-init.log").is_file()),
        ("no SSH host keys", any((root / "etc/ssh").glob("ssh_host_*_key"))),
        (f"no user {USER}", f"\n{USER}:" in "\n" + passwd),
        ("the NoCloud seed is still there", not (root / SEED_DIR).exists()),
        ("no .deb in the apt cache", any(archives.glob("*.deb"))),
        ("no apt cache files", any((root / "var/cache/apt").glob("*.bin"))),
        ("no apt lists", any((root / "var/lib/apt/lists").glob("*_Packages"))),
        ("empty /etc/machine-id", bool((root / "etc/machine-id").read_text().strip())),
    ]


def _link(path: Path) -> str:
    # The guest's links are absolute inside the guest: read them, never resolve them here.
    return os.readlink(path) if path.is_symlink() else ""


def selinux_recipe() -> dict[str, object]:
    """What `build_selinux_root()` adds to the used root; its cache key digests it."""
    return {
        "suite": SUITE,
        "mirror": MIRROR,
        "selinux_packages": SELINUX_PACKAGES,
        "selinux_config": SELINUX_CONFIG,
        "labelled": "setfiles",
    }


def build_selinux_root(base: Path, root: Path) -> None:
    """Build the SELinux variant of the used root `base` into the empty directory `root`."""
    with step(f"Copying the sample root into {root}"):
        run(["cp", "-a", f"{base}/.", root])  # a real copy: packages change files in place
    with step(f"Installing {', '.join(SELINUX_PACKAGES)} from {MIRROR}"):
        _install_from_mirror(root, SELINUX_PACKAGES)
    config = root / "etc/selinux/config"
    config.unlink(missing_ok=True)
    config.write_text(SELINUX_CONFIG)
    with step(f"Labelling {root} with its own SELinux policy"):
        label_root(root)
    verify_selinux_root(root)


def _install_from_mirror(root: Path, packages: Iterable[str]) -> None:
    """apt-get install from the Debian mirror, leaving the guest's apt state alone."""
    scratch = root / _APT_SCRATCH
    for sub in ("lists/partial", "archives/partial"):
        (scratch / sub).mkdir(parents=True)
    (scratch / "sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")
    inside = f"/{_APT_SCRATCH}"
    options = [
        f"-oDir::Etc::SourceList={inside}/sources.list",
        "-oDir::Etc::SourceParts=/nonexistent",
        f"-oDir::State::Lists={inside}/lists",
        f"-oDir::Cache::Archives={inside}/archives",
        "-oDir::Cache::pkgcache=",
        "-oDir::Cache::srcpkgcache=",
    ]
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)  # the guest's own names no real server
    policy = root / _POLICY_RC_D
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        _online_in_guest(root, ["apt-get", *options, "--quiet", "update"])
        install = ["apt-get", *options, "--quiet", "--yes", "--no-install-recommends", "install"]
        _online_in_guest(root, [*install, *packages])
    finally:
        policy.unlink()
        shutil.rmtree(scratch)
        resolv.unlink()
        resolv.write_text(RESOLV_CONF)
        resolv.chmod(0o644)


def _online_in_guest(root: Path, argv: list[Arg]) -> str:
    """Like `in_guest`, but sharing the host's network, for apt to reach the mirror."""
    sandbox: list[Arg] = ["unshare", "--uts", "--mount", "--pid", "--fork"]
    sandbox += [f"--mount-proc={root / 'proc'}", "chroot", root]
    hint = f"installing into the sample root needs a reachable {MIRROR}"
    return run([*sandbox, *argv], env=GUEST_ENV, hint=hint).stdout


def label_root(root: Path) -> None:
    """Give every file in `root` the label its own SELinux policy expects."""
    # in_guest mounts /proc inside the root, and its labels are the kernel's.
    in_guest(root, ["setfiles", "-e", "/proc", FILE_CONTEXTS, "/"])


def verify_selinux_root(root: Path) -> None:
    problems = [
        what
        for what, ok in (
            ("no setfiles", (root / "usr/sbin/setfiles").is_file()),
            (f"no {FILE_CONTEXTS}", (root / FILE_CONTEXTS.lstrip("/")).is_file()),
            ("/etc/passwd has no SELinux label", bool(_label(root / "etc/passwd"))),
            ("sources.list changed", (root / "etc/apt/sources.list").read_text() == SOURCES_LIST),
        )
        if not ok
    ]
    if problems:
        raise CareenError(
            f"the SELinux sample root {root} is incomplete: " + "; ".join(problems),
            hint="run with --debug and read the apt and setfiles output above",
        )


def _label(path: Path) -> str:
    try:
        return os.getxattr(path, "security.selinux", follow_symlinks=False).decode()
    except OSError:
        return ""


def _apt_problems(root: Path) -> list[str]:
    policy = in_guest(root, ["apt-cache", "policy", "cloud-init"])
    installed = re.search(r"Installed: (\S+)", policy)
    candidate = re.search(r"Candidate: (\S+)", policy)
    if not installed or not candidate:
        return [f"apt-cache policy cloud-init said: {policy.strip()}"]
    if candidate[1] != installed[1] + VERSION_SUFFIX:
        return [f"cloud-init candidate {candidate[1]} is not installed {installed[1]} + suffix"]
    return []
