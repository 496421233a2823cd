"""Recipes parse into steps, and every mistake names the step, the field and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from careen import recipe
from careen.errors import UsageError
from careen.recipe import Op, Step


def test_builtin_default_recipe() -> None:
    r = recipe.load("cloud-init-refresh")
    assert [s.op for s in r.steps] == [Op.UPDATE, Op.INSTALL, Op.CLEAN_CACHES, Op.RESET_CLOUD_INIT]
    assert r.steps[0].packages == ("cloud-init",)
    assert r.steps[1].packages == ("qemu-guest-agent",)


def test_every_operation(tmp_path: Path) -> None:
    (tmp_path / "fix.sh").write_text("#!/bin/sh\ntrue\n")
    (tmp_path / "motd").write_text("hello\n")
    text = """
name: everything
steps:
  - update: all
  - update: [cloud-init, openssh-server]
  - install: qemu-guest-agent
  - remove: [popularity-contest]
  - run: "echo hi"
  - script: fix.sh
  - upload: {src: motd, dest: /etc/motd, mode: "0600"}
  - write: {path: /etc/issue, content: "refitted\\n"}
  - delete: /var/tmp/*
  - clean-caches: true
  - reset-cloud-init: {machine-id: true}
  - reset-machine-id: true
  - remove-ssh-host-keys: true
"""
    r = recipe.parse(text, origin="r.yaml", base=tmp_path)
    assert r.name == "everything"
    assert r.steps[0] == Step(Op.UPDATE)
    assert r.steps[1].packages == ("cloud-init", "openssh-server")
    assert r.steps[2].packages == ("qemu-guest-agent",)
    assert r.steps[5].source == tmp_path / "fix.sh"
    assert r.steps[6] == Step(Op.UPLOAD, path="/etc/motd", source=tmp_path / "motd", mode=0o600)
    assert r.steps[7].content == "refitted\n" and r.steps[7].mode is None
    assert r.steps[10].machine_id is True
    assert len(r.digest) == 16


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps:\n  - frobnicate: true\n", "r.yaml:2: step 1: unknown operation 'frobnicate'"),
        ("steps:\n  - run: ok\n  - install: []\n", "r.yaml:3: step 2: install: give package"),
        ("steps:\n  - write: {path: etc/x, content: y}\n", "write: path must be an absolute"),
        ("steps:\n  - write: {path: /x}\n", "missing field(s) ['content']"),
        ("steps:\n  - write: {path: /x, content: y, mode: rw}\n", "mode 'rw' is not an octal"),
        ("steps:\n  - upload: {src: /nonexistent/x, dest: /x}\n", "is not a file on this host"),
        ("steps:\n  - delete: /\n", "refusing to delete the guest's root"),
        ("steps:\n  - run: a\n    install: b\n", "exactly one operation"),
        ("stepz: []\n", "unknown field 'stepz'"),
        ("name: x\n", "has no `steps:` list"),
        ("steps: [\n", "not valid YAML"),
        ("steps:\n  - clean-caches: maybe\n", "must be true or false"),
    ],
)
def test_errors_name_the_place(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        recipe.parse(text, origin="r.yaml", base=tmp_path)
    assert message in e.value.message


def test_unknown_recipe_names_builtins() -> None:
    with pytest.raises(UsageError) as e:
        recipe.load("no-such-recipe")
    assert "cloud-init-refresh" in e.value.hint


def test_command_line_steps(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert recipe.step_from_option(Op.UPDATE, None, tmp_path) == Step(Op.UPDATE)
    assert recipe.step_from_option(Op.INSTALL, "a,b", tmp_path).packages == ("a", "b")
    assert recipe.step_from_option(Op.WRITE, "/etc/x:a:b", tmp_path).content == "a:b"
    up = recipe.step_from_option(Op.UPLOAD, "f:/etc/f", tmp_path)
    assert up.source == tmp_path / "f" and up.path == "/etc/f"
    assert recipe.step_from_option(Op.RESET_CLOUD_INIT, None, tmp_path).op is Op.RESET_CLOUD_INIT
    with pytest.raises(UsageError):
        recipe.step_from_option(Op.WRITE, "nocolon", tmp_path)
    with pytest.raises(UsageError):
        recipe.step_from_option(Op.INSTALL, "--force-yes", tmp_path)
