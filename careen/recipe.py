"""Recipes: what to change in a guest, parsed and validated before anything is opened.

A recipe is YAML: a mapping with an optional `name` and `description` and a list of
`steps`, each step a mapping with exactly one key, the operation:

    name: my-refresh
    steps:
      - update: [cloud-init]        # named packages; `update: all` upgrades everything
      - install: [qemu-guest-agent]
      - remove: [popularity-contest]
      - run: "sed -i s/foo/bar/ /etc/example.conf"
      - script: ./fix-things.sh     # a file on this host, run inside the guest
      - upload: {src: ./motd, dest: /etc/motd, mode: "0644"}
      - write: {path: /etc/motd, content: "refitted\\n", mode: "0644"}
      - delete: /var/tmp/junk
      - clean-caches: true
      - reset-cloud-init: true      # or {machine-id: true} to also empty /etc/machine-id
      - reset-machine-id: true
      - remove-ssh-host-keys: true
      - reset-cloudbase-init: true  # Windows: empty LocalScripts, forget plugin state

Errors name the step, the field and the line. The same operations are available as
command-line options, which append steps after the recipe's.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from careen.errors import UsageError


class Op(StrEnum):
    UPDATE = "update"
    INSTALL = "install"
    REMOVE = "remove"
    RUN = "run"
    SCRIPT = "script"
    UPLOAD = "upload"
    WRITE = "write"
    DELETE = "delete"
    CLEAN_CACHES = "clean-caches"
    RESET_CLOUD_INIT = "reset-cloud-init"
    RESET_MACHINE_ID = "reset-machine-id"
    REMOVE_SSH_HOST_KEYS = "remove-ssh-host-keys"
    RESET_CLOUDBASE_INIT = "reset-cloudbase-init"

    @property
    def needs_package_manager(self) -> bool:
        return self in (Op.UPDATE, Op.INSTALL, Op.REMOVE)


@dataclass(frozen=True)
class Step:
    op: Op
    packages: tuple[str, ...] = ()  # update (empty: all), install, remove
    command: str = ""  # run
    path: str = ""  # write, delete, upload (destination)
    source: Path | None = None  # script, upload
    content: str = ""  # write
    mode: int | None = None  # write, upload
    machine_id: bool = False  # reset-cloud-init

    def describe(self) -> str:
        match self.op:
            case Op.UPDATE:
                return "update " + (" ".join(self.packages) or "all packages")
            case Op.INSTALL | Op.REMOVE:
                return f"{self.op} {' '.join(self.packages)}"
            case Op.RUN:
                return f"run {self.command!r}"
            case Op.SCRIPT:
                return f"run script {self.source}"
            case Op.UPLOAD:
                return f"upload {self.source} to {self.path}"
            case Op.WRITE | Op.DELETE:
                return f"{self.op} {self.path}"
            case _:
                return str(self.op)


@dataclass(frozen=True)
class PropertyChanges:
    """Image properties a recipe sets and unsets on the new Glance image."""

    set: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[Step, ...]
    description: str = ""
    origin: str = ""  # "built-in", a file path, or "command line"
    extra: tuple[Step, ...] = field(default=(), repr=False)
    properties: PropertyChanges | None = None  # Glance image properties, when publishing

    @property
    def all_steps(self) -> tuple[Step, ...]:
        return self.steps + self.extra

    @property
    def digest(self) -> str:
        """A short digest of what the recipe does (for provenance and caching)."""
        plain: list[Any] = [_plain(s) for s in self.all_steps]
        if self.properties:
            plain.append(_plain(self.properties))
        data = json.dumps(plain, sort_keys=True, default=str)
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def with_steps(self, extra: tuple[Step, ...]) -> Recipe:
        return replace(self, extra=self.extra + extra)


def _plain(obj: object) -> Any:
    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj


BUILTIN = ("cloud-init-refresh", "reset-identity", "cloudbase-init-reset", "empty")


class _Where:
    """Error context: which step and line a value came from."""

    def __init__(self, origin: str, node: yaml.Node, step: int | None = None) -> None:
        self.origin = origin
        self.line = node.start_mark.line + 1
        self.step = step

    def fail(self, message: str, hint: str = "") -> UsageError:
        where = f"{self.origin}:{self.line}"
        if self.step is not None:
            where += f": step {self.step}"
        return UsageError(f"{where}: {message}", hint or "see the recipe format in the README")


def load(ref: str) -> Recipe:
    """A built-in recipe by name, or a recipe file by path."""
    if ref in BUILTIN:
        text = resources.files("careen.recipes").joinpath(f"{ref}.yaml").read_text()
        return parse(text, origin=f"built-in {ref}", base=Path.cwd())
    path = Path(ref)
    if not path.exists():
        raise UsageError(
            f"no recipe {ref!r}: not a built-in and no such file",
            hint=f"built-in recipes: {', '.join(BUILTIN)}",
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(
            f"cannot read recipe {path}: {e}", hint="a recipe is a UTF-8 YAML file"
        ) from e
    return parse(text, origin=str(path), base=path.parent)


def parse(text: str, *, origin: str = "recipe", base: Path | None = None) -> Recipe:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(
            f"{origin}{line}: not valid YAML: {problem}",
            hint="check the indentation and quoting on that line",
        ) from e
    if root is None:
        raise UsageError(f"{origin}: the recipe is empty", "give it a `steps:` list")
    top = _mapping(root, _Where(origin, root))
    known = {"name", "description", "steps", "properties"}
    for key, (knode, _) in top.items():
        if key not in known:
            raise _Where(origin, knode).fail(f"unknown field {key!r} (expected {sorted(known)})")
    name = _string(top["name"][1], _Where(origin, root)) if "name" in top else Path(origin).stem
    desc = _string(top["description"][1], _Where(origin, root)) if "description" in top else ""
    props = _properties(top["properties"][1], origin) if "properties" in top else None
    if "steps" not in top:
        raise _Where(origin, root).fail("the recipe has no `steps:` list")
    steps_node = top["steps"][1]
    if not isinstance(steps_node, yaml.SequenceNode):
        if isinstance(steps_node, yaml.ScalarNode) and steps_node.value in ("", "null", "~"):
            return Recipe(name, (), desc, origin, properties=props)
        raise _Where(origin, steps_node).fail("`steps` must be a list")
    steps = tuple(
        parse_step(node, _Where(origin, node, i + 1), base or Path.cwd())
        for i, node in enumerate(steps_node.value)
    )
    return Recipe(name, steps, desc, origin, properties=props)


def _properties(node: yaml.Node, origin: str) -> PropertyChanges:
    """`properties: {set: {KEY: VALUE}, unset: [KEY]}`, applied when publishing to Glance."""
    where = _Where(origin, node)
    f = _fields(node, where, {"set", "unset"}, set())
    values: dict[str, str] = {}
    if "set" in f:
        for knode, vnode in _mapping(f["set"], _Where(origin, f["set"])).values():
            values[str(knode.value)] = _string(vnode, _Where(origin, vnode), "a property value")
    unset: tuple[str, ...] = ()
    if "unset" in f:
        items = f["unset"].value if isinstance(f["unset"], yaml.SequenceNode) else [f["unset"]]
        unset = tuple(_string(n, _Where(origin, n), "a property name") for n in items)
    if both := set(values) & set(unset):
        raise where.fail(f"properties both set and unset: {sorted(both)}")
    return PropertyChanges(values, unset)


def _mapping(node: yaml.Node, where: _Where) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise where.fail("expected a mapping")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for knode, vnode in node.value:
        out[str(knode.value)] = (knode, vnode)
    return out


def _string(node: yaml.Node, where: _Where, what: str = "value") -> str:
    if not isinstance(node, yaml.ScalarNode) or node.tag.endswith((":null", ":map", ":seq")):
        raise _Where(where.origin, node, where.step).fail(f"{what} must be a string")
    return str(node.value)


def _bool(node: yaml.Node, where: _Where, what: str) -> bool:
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":bool"):
        return node.value.lower() in ("true", "yes", "on")
    raise _Where(where.origin, node, where.step).fail(f"{what} must be true or false")


def _packages(node: yaml.Node, where: _Where, op: Op) -> tuple[str, ...]:
    if isinstance(node, yaml.ScalarNode) and op is Op.UPDATE and node.value in ("all", "*"):
        return ()
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    names = tuple(_string(n, where, f"{op}: package name") for n in items)
    if not names:
        raise where.fail(f"{op}: give package names (a list)")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_:~*=@/-]*", name):
            raise where.fail(f"{op}: {name!r} is not a package name")
    return names


def _mode(node: yaml.Node | None, where: _Where) -> int | None:
    if node is None:
        return None
    text = _string(node, where, "mode")
    try:
        mode = int(text, 8)
    except ValueError:
        raise where.fail(f'mode {text!r} is not an octal number like "0644"') from None
    if not 0 <= mode <= 0o7777:
        raise where.fail(f"mode {text!r} is out of range")
    return mode


def _guest_path(text: str, where: _Where, what: str) -> str:
    if not text.startswith("/"):
        raise where.fail(f"{what} must be an absolute path in the guest, not {text!r}")
    return text


def _host_file(text: str, where: _Where, base: Path) -> Path:
    path = (base / text).resolve()
    if not path.is_file():
        raise where.fail(f"{text!r} is not a file on this host")
    return path


def _fields(
    node: yaml.Node, where: _Where, allowed: set[str], required: set[str]
) -> dict[str, yaml.Node]:
    m = _mapping(node, where)
    for key, (knode, _) in m.items():
        if key not in allowed:
            raise _Where(where.origin, knode, where.step).fail(
                f"unknown field {key!r} (expected {sorted(allowed)})"
            )
    missing = required - m.keys()
    if missing:
        raise where.fail(f"missing field(s) {sorted(missing)}")
    return {k: v for k, (_, v) in m.items()}


def parse_step(node: yaml.Node, where: _Where, base: Path) -> Step:
    m = _mapping(node, where)
    if len(m) != 1:
        raise where.fail(f"a step is a mapping with exactly one operation, got {sorted(m)}")
    ((key, (knode, value)),) = m.items()
    try:
        op = Op(key)
    except ValueError:
        raise _Where(where.origin, knode, where.step).fail(
            f"unknown operation {key!r}", hint=f"operations: {', '.join(o.value for o in Op)}"
        ) from None
    return _STEP_PARSERS[op](op, value, where, base)


def _parse_packages(op: Op, node: yaml.Node, where: _Where, base: Path) -> Step:
    return Step(op, packages=_packages(node, where, op))


def _parse_run(op: Op, node: yaml.Node, where: _Where, base: Path) -> Step:
    command = _string(node, where, "run: command")
    if not command.strip():
        raise where.fail("run: the command is empty")
    return Step(op, command=command)


def _parse_script(op: Op, node: yaml.Node, where: _Where, base: Path) -> Step:
    return Step(op, source=_host_file(_string(node, where, "script: path"), where, base))


def _parse_upload(op: Op, node: yaml.Node, where: _Where, base: Path) -> Step:
    f = _fields(node, where, {"src", "dest", "mode"}, {"src", "dest"})
    src = _host_file(_string(f["src"], where, "upload: src"), where, base)
    dest = _guest_path(_string(f["dest"], where, "upload: dest"), where, "upload: dest")
    return Step(op, source=src, path=dest, mode=_mode(f.get("mode"), where))


def _parse_write(op: Op, node: yaml.Node, where: _Where, base: Path) -> Step:
    f = _fields(node, where, {"path", "content", "mode"}, {"path", "content"})
    path = _guest_path(_string(f["path"], where, "write: path"), where, "write: path")
    content = _string(f["content"], where, "write: content")
    return Step(op, path=path, content=content, mode=_mode(f.get("mode"), where))


# Deleting one of these would leave no system to boot; no recipe means that.
PROTECTED = frozenset(
    [
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/srv",
        "/sys",
        "/tmp",
        "/usr",
        "/var",
    ]
)


def _parse_delete(op: Op, node: yaml.Node, where: _Where, base: Path) -> Step:
    path = _guest_path(_string(node, where, "delete: path"), where, "delete: path")
    if path.rstrip("/") == "":
        raise where.fail("delete: refusing to delete the guest's root")
    if path.endswith("/"):
        raise where.fail(f"delete: give {path!r} without the trailing slash")
    parent, _, name = path.rpartition("/")
    if path in PROTECTED or (parent == "" and any(c in name for c in "*?[")):
        raise where.fail(f"delete: refusing to delete {path!r}, a top-level system directory")
    return Step(op, path=path)


def _parse_flag(op: Op, node: yaml.Node, where: _Where, base: Path) -> Step:
    if op is Op.RESET_CLOUD_INIT and isinstance(node, yaml.MappingNode):
        f = _fields(node, where, {"machine-id"}, set())
        mid = _bool(f["machine-id"], where, "machine-id") if "machine-id" in f else False
        return Step(op, machine_id=mid)
    if not _bool(node, where, str(op)):
        raise where.fail(f"{op}: false does nothing; remove the step instead")
    return Step(op)


_STEP_PARSERS = {
    Op.UPDATE: _parse_packages,
    Op.INSTALL: _parse_packages,
    Op.REMOVE: _parse_packages,
    Op.RUN: _parse_run,
    Op.SCRIPT: _parse_script,
    Op.UPLOAD: _parse_upload,
    Op.WRITE: _parse_write,
    Op.DELETE: _parse_delete,
    Op.CLEAN_CACHES: _parse_flag,
    Op.RESET_CLOUD_INIT: _parse_flag,
    Op.RESET_MACHINE_ID: _parse_flag,
    Op.REMOVE_SSH_HOST_KEYS: _parse_flag,
    Op.RESET_CLOUDBASE_INIT: _parse_flag,
}


def step_from_option(op: Op, value: str | None, base: Path) -> Step:
    """A step from a command-line option (`--install PKG`, `--write PATH:CONTENT`, ...)."""
    where = _Where("command line", _scalar(value or ""))
    text = value or ""
    if op.needs_package_manager:
        if op is Op.UPDATE and text in ("", "all"):
            return Step(op)
        seq = yaml.SequenceNode("tag:yaml.org,2002:seq", [_scalar(n) for n in text.split(",")])
        seq.start_mark = where_mark()
        return _parse_packages(op, seq, where, base)
    if op in (Op.UPLOAD, Op.WRITE):
        left, sep, right = text.rpartition(":") if op is Op.UPLOAD else text.partition(":")
        if not sep or not left:
            form = "SRC:DEST" if op is Op.UPLOAD else "PATH:CONTENT"
            example = "./motd:/etc/motd" if op is Op.UPLOAD else "/etc/issue:refitted"
            raise UsageError(f"--{op} takes {form}, got {text!r}", f"for example --{op} {example}")
        if op is Op.UPLOAD:
            src = _host_file(left, where, base)
            return Step(op, source=src, path=_guest_path(right, where, "--upload DEST"))
        return Step(op, path=_guest_path(left, where, "--write PATH"), content=right)
    if value is None:
        return _parse_flag(op, _scalar("true", "tag:yaml.org,2002:bool"), where, base)
    return _STEP_PARSERS[op](op, _scalar(text), where, base)


def where_mark() -> yaml.Mark:
    return yaml.Mark("command line", 0, 0, 0, "", 0)


def _scalar(value: str, tag: str = "tag:yaml.org,2002:str") -> yaml.ScalarNode:
    return yaml.ScalarNode(tag, value, where_mark(), where_mark())
