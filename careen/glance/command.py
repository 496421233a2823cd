"""`careen refit glance:ID|NAME [-o glance:[NAME] | -o FILE]`: the Glance side of refit.

The order is what makes a failure leave no trace: look the image up and refuse what
cannot work (no download yet); create the new image, queued and journaled, which is
also the real test of what the caller may set; download and probe against Glance's
disk_format; refit into a work file; upload, wait for `active`, compare hashes, re-add
members; and only then retire the old image. Any failure or Ctrl-C before the end
deletes the new image; the old one is never touched until then.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from careen import __version__, journal
from careen.errors import CareenError, ExitCode, UsageError
from careen.glance import metadata, publish, source
from careen.glance.cloud import Cloud, connect
from careen.image import probe
from careen.image.model import ImageFormat
from careen.log import step
from careen.output import check_destination
from careen.recipe import PropertyChanges
from careen.refit import RefitOptions, RefitResult, refit, workdir

log = logging.getLogger(__name__)

PUBLISH_FORMATS = ("qcow2", "raw")


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Glance (IMAGE as glance:ID or glance:NAME; -o glance:[NAME])")
    g.add_argument("--os-cloud", metavar="NAME", help="the cloud in clouds.yaml (or OS_CLOUD)")
    g.add_argument(
        "--disk-format", choices=PUBLISH_FORMATS, help="publish in this format (default: source's)"
    )
    g.add_argument(
        "--import",
        dest="use_import",
        action="store_true",
        help="upload with the glance-direct import instead of a plain PUT",
    )
    g.add_argument("--store", help="the store to upload into (multi-store clouds)")
    g.add_argument(
        "--retire",
        choices=[r.value for r in publish.Retire],
        default="keep",
        help="what happens to the old image once the new one is active",
    )
    g.add_argument(
        "--retire-suffix",
        default="-retired",
        help="appended to the old name by --retire rename (default -retired)",
    )
    g.add_argument(
        "--take-name",
        action="store_true",
        help="give the new image the old image's name after retiring it",
    )
    g.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")


def wanted(args: argparse.Namespace) -> bool:
    return source.is_ref(str(args.image)) or source.is_ref(str(args.output or ""))


@dataclass
class GlanceResult:
    source: dict[str, Any]
    new_image: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    retired: str | None = None


def _check_args(args: argparse.Namespace, publishing: bool) -> None:
    if not source.is_ref(str(args.image)):
        raise UsageError(
            "publishing a local file to Glance is not supported yet",
            hint="refit from glance:ID, or write a file with -o FILE and upload it",
        )
    if args.in_place:
        raise UsageError(
            "--in-place cannot change a Glance image: Glance images are immutable",
            hint="publish a new image with -o glance:",
        )
    if args.output is None:
        raise UsageError(
            "refit needs an output", hint="add -o glance: to publish a new image, or -o FILE"
        )
    glance_only = {
        "--import": args.use_import,
        "--store": args.store,
        "--take-name": args.take_name,
        "--retire": args.retire != "keep",
        "--disk-format": args.disk_format,
    }
    if not publishing and (used := [k for k, v in glance_only.items() if v]):
        raise UsageError(
            f"{', '.join(used)} only apply when publishing",
            hint="use -o glance: to publish the result as a new Glance image",
        )
    if args.take_name and args.retire in ("keep",):
        raise UsageError(
            "--take-name needs --retire (rename, hide, deactivate or delete)",
            hint="otherwise two visible images would share the name",
        )


def run_refit(
    args: argparse.Namespace,
    make_options: Callable[[argparse.Namespace], RefitOptions],
    jsonable: Callable[[object], Any],
    print_result: Callable[[RefitResult], None],
) -> int:
    publishing = source.is_ref(str(args.output or ""))
    _check_args(args, publishing)
    opts = make_options(args)
    if not publishing:
        check_destination(args.output.absolute(), Path("/nonexistent"), force=args.force)
    if not publishing and opts.recipe.properties:
        log.warning("the recipe's image properties apply only when publishing to Glance")
    cloud = connect(args.os_cloud)
    try:
        src = source.find_image(cloud, source.ref_value(str(args.image)))
        source.check_refittable(cloud, src, may_publicize=cloud.is_admin)
        out_fmt = _output_format(args, src, publishing)
        parent = _work_parent(args, publishing)
        source.check_space(parent, src)
        plan = _plan(cloud, src, args, opts, out_fmt) if publishing else None
        if publishing and args.store:
            publish.check_store(cloud, args.store)
        if publishing and args.use_import and "glance-direct" not in publish.import_methods(cloud):
            raise CareenError(
                "the cloud does not offer the glance-direct import",
                hint="drop --import to upload with a plain PUT",
            )
        if args.dry_run:
            _print_plan(args, src, plan, out_fmt)
            return ExitCode.OK
        result, glance = _refit_and_publish(cloud, src, args, opts, out_fmt, plan)
    finally:
        cloud.close()
    if args.format == "json":
        print(json.dumps({**jsonable(result), "glance": jsonable(glance)}, indent=2))
    else:
        print_result(result)
        _print_glance(glance)
    return ExitCode.OK


def _work_parent(args: argparse.Namespace, publishing: bool) -> Path:
    # The download, overlay and output go beside -o FILE, or under $TMPDIR when publishing.
    if args.workdir:
        return Path(args.workdir)
    return Path(tempfile.gettempdir()) if publishing else args.output.absolute().parent


def _output_format(args: argparse.Namespace, src: source.SourceImage, publishing: bool) -> str:
    if not publishing:
        return str(args.output_format)
    fmt = args.disk_format or str(src.image["disk_format"])
    if fmt not in PUBLISH_FORMATS:
        raise UsageError(
            f"careen cannot write {fmt} for the new image",
            hint="add --disk-format qcow2 or --disk-format raw",
        )
    return str(fmt)


def _plan(
    cloud: Cloud, src: source.SourceImage, args: argparse.Namespace, opts: RefitOptions, fmt: str
) -> metadata.Plan:
    name = source.ref_value(str(args.output)) or None
    recipe = opts.recipe
    provenance = {
        "careen_source_image": src.id,
        "careen_recipe": recipe.name,
        "careen_recipe_digest": recipe.digest,
        "careen_version": __version__,
        "careen_refitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    changes = recipe.properties or PropertyChanges()
    for key in [*changes.set, *changes.unset]:
        metadata.check_key(key)
    virtual = src.image.get("virtual_size")
    plan = metadata.new_image_body(
        src.image,
        name=name,
        disk_format=fmt,
        virtual_size=int(virtual) if virtual else None,
        caller_project=cloud.project_id,
        may_set_owner=cloud.is_admin,
        changes=changes,
        provenance=provenance,
    )
    plan.body[metadata.RUN_KEY] = journal.current_run_id() or "none"
    return plan


@contextmanager
def _work_file(path: Path, what: str) -> Iterator[Path]:
    handle = journal.record("file", path=str(path), what=what)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        handle.done()


def _progress(what: str, total: int, stack: ExitStack) -> Callable[[int], None] | None:
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    stack.enter_context(bar)
    task = bar.add_task(what, total=total)
    return lambda done: bar.update(task, completed=done)


def _refit_and_publish(
    cloud: Cloud,
    src: source.SourceImage,
    args: argparse.Namespace,
    opts: RefitOptions,
    out_fmt: str,
    plan: metadata.Plan | None,
) -> tuple[RefitResult, GlanceResult]:
    glance = GlanceResult(source={"id": src.id, "name": src.name})
    parent = _work_parent(args, plan is not None)
    with ExitStack() as stack:
        work = stack.enter_context(workdir(parent))
        new = None
        if plan is not None:
            with step("Creating the new image (queued until its data is uploaded)"):
                new = stack.enter_context(publish.queued_image(cloud, plan.body))
        local = stack.enter_context(
            _work_file(work / f"source.{src.image['disk_format']}", "downloaded Glance image")
        )
        with ExitStack() as bar, step(f"Downloading image {src.label()} ({src.size >> 20} MiB)"):
            source.download(cloud, src, local, _progress("download", src.size, bar))
        probe.probe_image(local, expected_format=src.format)
        if plan is None:
            result = refit(replace(opts, source=local, workdir=work))
            return result, glance
        assert new is not None
        new_id = new.id
        out = stack.enter_context(_work_file(work / f"refitted.{out_fmt}", "refitted image"))
        result = refit(
            replace(
                opts,
                source=local,
                output=out,
                workdir=work,
                output_format=ImageFormat(out_fmt),
                compress=False,
            )
        )
        journal.checkpoint("glance-upload")
        size = out.stat().st_size
        with ExitStack() as bar, step(f"Uploading the new image {new_id} ({size >> 20} MiB)"):
            digests = publish.upload(
                cloud,
                new_id,
                out,
                use_import=args.use_import,
                store=args.store,
                progress=_progress("upload", size, bar),
            )
        image = publish.wait_active(cloud, new_id)
        algo, value = publish.check_hashes(image, out, digests)
        members = publish.members_of(cloud, src)
        notes, pending = publish.finish(cloud, new_id, protected=plan.protected, members=members)
        glance.notes += plan.notes + notes
        if pending:
            glance.notes.append(
                f"members re-added, pending until they accept: {', '.join(pending)}"
            )
        result.output = None
        glance.new_image = {
            "id": new_id,
            "name": plan.body["name"],
            "disk_format": out_fmt,
            "visibility": plan.body["visibility"],
            "os_hash_algo": algo,
            "os_hash_value": value,
            "members_pending": pending,
        }
        new.keep()
    glance.retired = publish.retire(cloud, src, publish.Retire(args.retire), args.retire_suffix)
    if args.take_name and src.name:
        publish.take_name(cloud, new_id, src.name)
        glance.new_image["name"] = src.name
    return result, glance


def _print_plan(
    args: argparse.Namespace,
    src: source.SourceImage,
    plan: metadata.Plan | None,
    out_fmt: str,
) -> None:
    data: dict[str, Any] = {
        "dry_run": True,
        "download": {
            "id": src.id,
            "name": src.name,
            "disk_format": src.image["disk_format"],
            "size": src.size,
        },
        "recipe": getattr(args, "recipe", None) or "cloud-init-refresh",
    }
    if plan is None:
        data["output"] = str(args.output)
    else:
        data["create"] = {k: v for k, v in plan.body.items() if k != metadata.RUN_KEY}
        data["create"]["protected"] = plan.protected
        data["upload"] = "glance-direct import" if args.use_import else "PUT"
        data["store"] = args.store
        data["retire"] = args.retire
        data["take_name"] = args.take_name
        data["notes"] = plan.notes
    if args.format == "json":
        print(json.dumps(data, indent=2, default=str))
        return
    print(f"Would download image {src.label()}: {src.image['disk_format']}, {src.size} bytes")
    print(f"Would refit it with recipe {data['recipe']}")
    if plan is None:
        print(f"Would write {args.output} ({out_fmt})")
        return
    body = data["create"]
    print(f"Would create image {body['name']!r} ({out_fmt}, {body['visibility']}) with:")
    for key in sorted(body):
        print(f"  {key} = {body[key]!r}")
    print(
        f"Would upload it with {data['upload']}"
        + (f" into store {args.store}" if args.store else "")
    )
    print(
        f"Would retire the old image: {args.retire}"
        + (", and give its name to the new one" if args.take_name else "")
    )
    for note in plan.notes:
        print(f"note: {note}")
    print("Nothing was changed (--dry-run)")


def _print_glance(glance: GlanceResult) -> None:
    for note in glance.notes:
        print(f"note: {note}")
    if glance.new_image:
        img = glance.new_image
        print(
            f"Published image {img['id']} ({img['name']!r}, {img['disk_format']}, "
            f"{img['os_hash_algo']} verified)"
        )
    if glance.retired:
        print(glance.retired)
