"""The method files, found by their HELPERS banner: the one list the tests and tests/benchmark.py take, so a new
method file is checked (and its helper block held equal) with no edit here or in any test."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANNER = "# " + "=" * 113 + "\n# HELPERS"  # where every method file's shared helper block begins


def is_method_file(path):
    """A Python file whose text holds the banner."""
    if not (path.endswith(".py") and os.path.isfile(path)):
        return False
    with open(path) as f:
        return BANNER in f.read()


def method_files(root=REPO):
    """The names of the method files directly in `root` (moco.py, ...), sorted."""
    names = [name for name in os.listdir(root) if name.endswith(".py")]
    return sorted(name for name in names if is_method_file(os.path.join(root, name)))


METHODS = [name.removesuffix(".py") for name in method_files()]  # moco, gersp, ...: the modules' names
