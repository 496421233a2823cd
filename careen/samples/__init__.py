"""Real sample guest images for careen's demo and test suite.

A Debian 12 root is bootstrapped, booted once in spirit (its own cloud-init runs
offline from a NoCloud seed), given a local apt repository with a newer cloud-init, and
written into disks of several layouts: MBR, GPT, a CentOS-style LVM disk, a bare
filesystem, and qcow2 conversions. Everything is cached by recipe; see
`careen.samples.cache`.
"""

import json
from collections.abc import Mapping
from pathlib import Path

from careen.samples.build import Layout, make_image
from careen.samples.cache import cache_dir, sample_image, sample_root

__all__ = [
    "PATH_FORMATS",
    "Layout",
    "cache_dir",
    "format_paths",
    "make_image",
    "sample_image",
    "sample_root",
]

PATH_FORMATS = ("path", "json")


def format_paths(images: Mapping[str, Path], fmt: str = "path") -> str:
    """What the builders print: one path a line, or ("json") an object of name to path."""
    if fmt == "json":
        return json.dumps({name: str(path) for name, path in images.items()}, indent=2)
    return "\n".join(str(path) for path in images.values())
