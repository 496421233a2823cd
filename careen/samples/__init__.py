"""Real sample guest images for careen's demo and test suite.

A Debian 12 root is bootstrapped, booted once in spirit (its own cloud-init runs
offline from a NoCloud seed), given a local apt repository with a newer cloud-init, and
written into disks of several layouts: MBR, GPT, a CentOS-style LVM disk, a bare
filesystem, and qcow2 conversions. Everything is cached by recipe; see
`careen.samples.cache`.
"""

from careen.samples.build import Layout, make_image
from careen.samples.cache import cache_dir, sample_image, sample_root

__all__ = ["Layout", "cache_dir", "make_image", "sample_image", "sample_root"]
