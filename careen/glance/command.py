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
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from careen import __version__, journal, limits
from careen.errors import CareenError, ExitCode, UsageError
from careen.glance import metadata, publish, source
from careen.glance.cloud import Cloud, connect
from careen.image import probe
from careen.image.model import ImageFormat
from careen.log import progress_bar, step
from careen.output import check_destination, write_image
from careen.recipe import PropertyChanges, Recipe
from careen.recipe import load as load_recipe
from careen.refit import RefitOptions, RefitResult, refit, workdir

log = logging.getLogger(__name__)

PUBLISH_FORMATS = ("qcow2", "raw")


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Glance (IMAGE as glance:ID or glance:NAME; -o glance:[NAME])")
    _add_publish_options(g)
    c = p.add_argument_group("Ceph (a Glance image stored in RBD is refitted inside the cluster)")
    c.add_argument("--ceph-conf", type=Path, help="the cluster's ceph.conf (or CEPH_CONF)")
    c.add_argument("--ceph-user", help="the Ceph client, without client. (default admin)")
    c.add_argument("--keyring", type=Path, help="that client's keyring")
    c.add_argument(
        "--rbd-pool",
        help="the Glance pool, when the cloud does not show the image's location",
    )
    c.add_argument(
        "--via-glance",
        action="store_true",
        help="download and upload through the Glance API even when the image is in Ceph",
    )


def add_publish_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "publish",
        help="publish a refitted image file to Glance with the metadata of an existing image",
    )
    p.add_argument("file", type=Path, help="the refitted image (qcow2 or raw)")
    p.add_argument(
        "--like",
        required=True,
        metavar="glance:ID",
        help="the image whose metadata the new one takes, and which --retire retires",
    )
    p.add_argument("--name", help="the new image's name (default: the --like image's)")
    p.add_argument(
        "-r",
        "--recipe",
        help="the recipe the file was refitted with: its properties apply, and its name "
        "and digest are recorded (its steps are not run)",
    )
    p.add_argument("--workdir", type=Path, help="where a format conversion is written")
    p.add_argument("--format", choices=("text", "json"), default="text")
    _add_publish_options(p.add_argument_group("Glance"))


def _add_publish_options(g: argparse._ArgumentGroup) -> None:
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
    g.add_argument(
        "--new-image-id",
        type=_uuid,
        metavar="UUID",
        help="the new image's ID (careen fleet derives one per attempt, so that two runs of "
        "the same attempt collide in Glance instead of publishing twice)",
    )
    g.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")


def _uuid(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def wanted(args: argparse.Namespace) -> bool:
    return source.is_ref(str(args.image)) or source.is_ref(str(args.output or ""))


@dataclass
class GlanceResult:
    source: dict[str, Any]
    new_image: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    retired: str | None = None
    figures: dict[str, Any] | None = None  # bytes and seconds per step (Ceph)


def _check_args(args: argparse.Namespace, publishing: bool) -> None:
    if not source.is_ref(str(args.image)):
        raise UsageError(
            "refit publishes to Glance only what it refits from Glance",
            hint="refit into a file, then: careen publish FILE --like glance:ID",
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
        "--new-image-id": args.new_image_id,
    }
    if not publishing and (used := [k for k, v in glance_only.items() if v]):
        raise UsageError(
            f"{', '.join(used)} only apply when publishing",
            hint="use -o glance: to publish the result as a new Glance image",
        )
    _check_retire_args(args)


def _check_retire_args(args: argparse.Namespace) -> None:
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
        source.check_refittable(src, may_publicize=cloud.is_admin)
        in_ceph = _in_ceph(args, src) if publishing else None
        out_fmt = "raw" if in_ceph else _output_format(args, src, publishing)
        if in_ceph is None:
            source.check_space(_work_parent(args, publishing), src)
        name = source.ref_value(str(args.output)) or None
        plan = _plan(cloud, src, name, opts.recipe, out_fmt) if publishing else None
        if plan is not None and args.new_image_id:
            plan.body["id"] = args.new_image_id
        if in_ceph is not None and plan is not None:
            done = _refit_in_ceph(cloud, src, in_ceph, args, opts, plan)
            if done is None:
                return ExitCode.OK  # --dry-run
            result, glance = done
        else:
            if publishing:
                _check_upload_path(cloud, args)
            if args.dry_run:
                _print_download_plan(args, src, opts, plan, out_fmt)
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


def _in_ceph(args: argparse.Namespace, src: source.SourceImage) -> Any:
    """Where the source lives in Ceph when the refit is to happen there, else None."""
    from careen.ceph import location
    from careen.ceph.cluster import DEFAULT_CONF
    from careen.ceph.publish import source_ref

    asked = bool(args.ceph_conf or args.rbd_pool or args.ceph_user or args.keyring)
    if args.via_glance:
        if asked:
            raise UsageError("--via-glance excludes the Ceph options", hint="drop one or the other")
        return None
    found = location.of_image(src.image)
    if found is None and (src.image.get("locations") or src.image.get("direct_url")):
        log.info("Image %s is not stored in Ceph: going through the Glance API", src.label())
        return None
    ref = source_ref(src, found, args.rbd_pool)
    if ref is None:
        if asked:
            raise CareenError(
                f"the cloud does not show where image {src.label()} is stored",
                hint="name its pool with --rbd-pool (Glance names the RBD image by the image ID)",
            )
        return None
    has_conf = args.ceph_conf or os.environ.get("CEPH_CONF") or DEFAULT_CONF.is_file()
    if not has_conf:
        log.info(
            "Image %s is stored in Ceph (%s), but there is no Ceph configuration here: "
            "going through the Glance API",
            src.label(),
            ref.spec(),
        )
        return None
    if src.format not in (ImageFormat.RAW, ImageFormat.QCOW2):
        raise CareenError(
            f"image {src.label()} is stored in Ceph as {src.format.value}; careen refits "
            "raw and qcow2 RBD images in the cluster",
            hint="add --via-glance to download, refit and upload it through Glance",
        )
    for flag, used in (
        ("--disk-format qcow2", args.disk_format == "qcow2"),
        ("--import", args.use_import),
        ("--store", args.store),
    ):
        if used:
            raise UsageError(
                f"{flag} does not apply to a refit inside Ceph (the new image is raw, in "
                "the source's pool)",
                hint="drop it, or add --via-glance to go through the Glance API",
            )
    return ref


def _refit_in_ceph(
    cloud: Cloud,
    src: source.SourceImage,
    ref: Any,
    args: argparse.Namespace,
    opts: RefitOptions,
    plan: metadata.Plan,
) -> tuple[RefitResult, GlanceResult] | None:
    """The Ceph flow (careen.ceph.publish); None after a --dry-run."""
    from careen.ceph import publish as in_ceph
    from careen.ceph.cluster import CephAccess

    access = CephAccess.from_options(args.ceph_conf, args.ceph_user, args.keyring)
    with in_ceph.cluster_for(access) as cluster:
        in_ceph.check_cluster(cluster, ref)
        retire = publish.Retire(args.retire)
        if retire is publish.Retire.DELETE:
            in_ceph.check_deletable(cluster, ref, src.label())
        if args.dry_run:
            where = f"rbd://{cluster.fsid}/{ref.pool}/<new image ID>/snap"
            data = {
                "rbd": {"source": ref.spec(), "fsid": cluster.fsid, "location": where},
                "recipe": opts.recipe.name,
            }
            lines = [
                f"Would copy {ref.spec()} to {ref.pool}/<new image ID> inside the cluster "
                f"{cluster.fsid}",
                f"Would refit the copy in place with recipe {opts.recipe.name}",
                f"Would snapshot and protect it, and register {where}",
            ]
            _print_plan(args, data, plan, "raw", lines)
            return None
        done = in_ceph.refit_in_cluster(cloud, cluster, src, ref, plan, opts)
        glance = GlanceResult(source={"id": src.id, "name": src.name})
        glance.notes += plan.notes + done.notes
        if done.pending:
            glance.notes.append(
                f"members re-added, pending until they accept: {', '.join(done.pending)}"
            )
        glance.notes.append(f"location registered with {done.api}")
        glance.new_image = {
            "id": done.new_id,
            "name": plan.body["name"],
            "disk_format": "raw",
            "visibility": plan.body["visibility"],
            "os_hash_algo": done.hash_algo,
            "os_hash_value": done.hash_value,
            "members_pending": done.pending,
            "location": done.location,
        }
        glance.figures = done.figures.as_dict()
        if retire is publish.Retire.DELETE:
            in_ceph.check_deletable(cluster, ref, src.label())
        _retire(cloud, src, args, glance, done.new_id)
    return done.result, glance


def _print_download_plan(
    args: argparse.Namespace,
    src: source.SourceImage,
    opts: RefitOptions,
    plan: metadata.Plan | None,
    out_fmt: str,
) -> None:
    data = {
        "download": {
            "id": src.id,
            "name": src.name,
            "disk_format": src.image["disk_format"],
            "size": src.size,
        },
        "recipe": opts.recipe.name,
    }
    lines = [
        f"Would download image {src.label()}: {src.image['disk_format']}, {src.size} bytes",
        f"Would refit it with recipe {opts.recipe.name}",
    ]
    _print_plan(args, data, plan, out_fmt, lines)


def run_publish(args: argparse.Namespace, jsonable: Callable[[object], Any]) -> int:
    """`careen publish FILE --like glance:ID`: the publishing half of a Glance refit."""
    if not source.is_ref(str(args.like)):
        raise UsageError(
            f"--like takes a Glance image, not {args.like!r}",
            hint="write --like glance:ID or --like glance:NAME",
        )
    _check_retire_args(args)
    path = Path(args.file).absolute()
    info = probe.probe_image(path)
    recipe = load_recipe(args.recipe) if args.recipe else None
    cloud = connect(args.os_cloud)
    try:
        src = source.find_image(cloud, source.ref_value(str(args.like)))
        source.check_template(src, may_publicize=cloud.is_admin)
        fmt = _publish_format(args.disk_format or str(src.image.get("disk_format")))
        plan = _plan(cloud, src, args.name, recipe, fmt, virtual=info.virtual_size)
        if args.new_image_id:
            plan.body["id"] = args.new_image_id
        if recipe is None:
            plan.notes.append(
                "no recipe named (-r): the new image records none (careen_recipe unset)"
            )
        _check_upload_path(cloud, args)
        if args.dry_run:
            data = {"file": {"path": str(path), "format": info.format.value}}
            converting = f", converted to {fmt}" if info.format.value != fmt else ""
            lines = [f"Would publish {path} ({info.format.value}{converting})"]
            _print_plan(args, data, plan, fmt, lines)
            return ExitCode.OK
        glance = GlanceResult(source={"id": src.id, "name": src.name})
        with ExitStack() as stack:
            new = _queued(stack, cloud, plan)
            if info.format.value != fmt:
                work = stack.enter_context(workdir(args.workdir, what="conversion directory"))
                data_path = stack.enter_context(
                    _work_file(work / f"converted.{fmt}", "converted image")
                )
                with step(f"Converting {path.name} from {info.format.value} to {fmt}"):
                    write_image(path, info.format, data_path, ImageFormat(fmt), compress=False)
            else:
                data_path = path
            _publish(cloud, src, plan, new, data_path, fmt, args, glance)
        _retire(cloud, src, args, glance, new.id)
    finally:
        cloud.close()
    if args.format == "json":
        print(json.dumps({"file": str(path), "glance": jsonable(glance)}, indent=2))
    else:
        _print_glance(glance)
    return ExitCode.OK


def _publish_format(fmt: str) -> str:
    if fmt not in PUBLISH_FORMATS:
        raise UsageError(
            f"careen cannot write {fmt} for the new image",
            hint="add --disk-format qcow2 or --disk-format raw",
        )
    return fmt


def _work_parent(args: argparse.Namespace, publishing: bool) -> Path:
    # The download, overlay and output go beside -o FILE, or under $TMPDIR when publishing.
    if args.workdir:
        return Path(args.workdir)
    return Path(tempfile.gettempdir()) if publishing else args.output.absolute().parent


def _output_format(args: argparse.Namespace, src: source.SourceImage, publishing: bool) -> str:
    if not publishing:
        return str(args.output_format)
    return _publish_format(args.disk_format or str(src.image["disk_format"]))


def _plan(
    cloud: Cloud,
    src: source.SourceImage,
    name: str | None,
    recipe: Recipe | None,
    fmt: str,
    virtual: int | None = None,
) -> metadata.Plan:
    provenance = {"careen_source_image": src.id}
    if recipe is not None:  # a published file's recipe is known only when named
        provenance |= {"careen_recipe": recipe.name, "careen_recipe_digest": recipe.digest}
    provenance |= {
        "careen_version": __version__,
        "careen_refitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    changes = (recipe.properties if recipe else None) or PropertyChanges()
    for key in [*changes.set, *changes.unset]:
        metadata.check_key(key)
    if virtual is None and src.image.get("virtual_size"):
        virtual = int(src.image["virtual_size"])
    plan = metadata.new_image_body(
        src.image,
        name=name,
        disk_format=fmt,
        virtual_size=virtual,
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
        new = _queued(stack, cloud, plan) if plan is not None else None
        local = stack.enter_context(
            _work_file(work / f"source.{src.image['disk_format']}", "downloaded Glance image")
        )
        with (
            limits.slot("downloads"),
            ExitStack() as bar,
            step(f"Downloading image {src.label()} ({src.size >> 20} MiB)"),
        ):
            source.download(cloud, src, local, progress_bar("download", src.size, bar))
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
        result.output = None
        _publish(cloud, src, plan, new, out, out_fmt, args, glance)
    _retire(cloud, src, args, glance, new_id)
    return result, glance


def _queued(stack: ExitStack, cloud: Cloud, plan: metadata.Plan) -> publish.NewImage:
    with step("Creating the new image (queued until its data is uploaded)"):
        return stack.enter_context(publish.queued_image(cloud, plan.body))


def _check_upload_path(cloud: Cloud, args: argparse.Namespace) -> None:
    if args.store:
        publish.check_store(cloud, args.store)
    if args.use_import and "glance-direct" not in publish.import_methods(cloud):
        raise CareenError(
            "the cloud does not offer the glance-direct import",
            hint="drop --import to upload with a plain PUT",
        )


def _publish(
    cloud: Cloud,
    src: source.SourceImage,
    plan: metadata.Plan,
    new: publish.NewImage,
    path: Path,
    fmt: str,
    args: argparse.Namespace,
    glance: GlanceResult,
) -> None:
    """Upload `path` into the queued image, check it, finish it: it is then published."""
    journal.checkpoint("glance-upload")
    size = path.stat().st_size
    with ExitStack() as bar, step(f"Uploading the new image {new.id} ({size >> 20} MiB)"):
        digests = publish.upload(
            cloud,
            new.id,
            path,
            use_import=args.use_import,
            store=args.store,
            progress=progress_bar("upload", size, bar),
        )
    image = publish.wait_active(cloud, new.id)
    algo, value = publish.check_hashes(image, path, digests)
    members = publish.members_of(cloud, src)
    notes, pending = publish.finish(cloud, new.id, protected=plan.protected, members=members)
    glance.notes += plan.notes + notes
    if pending:
        glance.notes.append(f"members re-added, pending until they accept: {', '.join(pending)}")
    glance.new_image = {
        "id": new.id,
        "name": plan.body["name"],
        "disk_format": fmt,
        "visibility": plan.body["visibility"],
        "os_hash_algo": algo,
        "os_hash_value": value,
        "members_pending": pending,
        "size": size,
    }
    new.keep()


def _retire(
    cloud: Cloud,
    src: source.SourceImage,
    args: argparse.Namespace,
    glance: GlanceResult,
    new_id: str,
) -> None:
    """Only once the new image is active and checked: retire the old one, as asked."""
    glance.retired = publish.retire(cloud, src, publish.Retire(args.retire), args.retire_suffix)
    if args.take_name and src.name and glance.new_image is not None:
        publish.take_name(cloud, new_id, src.name)
        glance.new_image["name"] = src.name


def _print_plan(
    args: argparse.Namespace,
    data: dict[str, Any],
    plan: metadata.Plan | None,
    out_fmt: str,
    lines: list[str],
) -> None:
    """Print what would be done: `data` and `lines` say where the data comes from."""
    data["dry_run"] = True
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
    for line in lines:
        print(line)
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
            + (f" at {img['location']}" if img.get("location") else "")
        )
    if glance.figures:
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in glance.figures["seconds"].items())
        print(f"Copied {glance.figures['copied_bytes'] >> 20} MiB inside Ceph; {steps}")
    if glance.retired:
        print(glance.retired)
