"""Build the sample images: `python -m careen.samples [LAYOUT ...]`.

Prints a JSON object that maps each layout to its cached image.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from careen.errors import CareenError, ExitCode
from careen.samples import Layout, sample_image


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
    parser.add_argument("--debug", action="store_true", help="show every command")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    try:
        images = {str(lay): str(sample_image(lay, args.cache)) for lay in args.layouts or Layout}
    except CareenError as e:
        print(f"error: {e}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    print(json.dumps(images, indent=2))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
