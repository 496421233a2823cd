"""Build the sample images: `python -m careen.samples [LAYOUT ...] [--format path|json]`.

Prints the path of each cached image, one a line in the order asked for (so
`$(python -m careen.samples bare)` is the image), or with `--format json` an object that
maps each layout to its image.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from careen.errors import CareenError, ExitCode
from careen.samples import PATH_FORMATS, Layout, format_paths, sample_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m careen.samples", description=__doc__)
    parser.add_argument(
        "layouts",
        nargs="*",
        type=Layout,
        metavar="LAYOUT",
        help=f"one of {', '.join(Layout)} (default: all)",
    )
    parser.add_argument("--cache", type=Path, help="cache directory (default: $CAREEN_CACHE)")
    parser.add_argument(
        "--format",
        choices=PATH_FORMATS,
        default="path",
        help="print one path a line (default), or a JSON object of layout to path",
    )
    parser.add_argument("--debug", action="store_true", help="show every command")
    args = parser.parse_args(argv)
    # The log goes to stderr, so that stdout holds only what --format says.
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    try:
        images = {str(lay): sample_image(lay, args.cache) for lay in args.layouts or Layout}
    except CareenError as e:
        print(f"error: {e}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    print(format_paths(images, args.format))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
