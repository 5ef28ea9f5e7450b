"""A corpus that every Python installation has: the standard library's own ``.py`` sources.

``stdlib_path()`` is the running interpreter's standard library directory
(``sysconfig.get_paths()["stdlib"]``); ``stdlib_options()`` the ``text`` task options
for it: ``.py`` files only, without installed third-party packages (``site-packages``,
``dist-packages``) and the large, data-like test suites. On CPython 3.11 that is about
730 files and 12 MB, split by path hash into 650 training and 84 held-out files
(10.4M / 1.8M byte-level tokens).
"""
from __future__ import annotations

import sysconfig

EXCLUDE = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")


def stdlib_path() -> str:
    """The standard library directory of the interpreter running this code."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_options(**overrides) -> dict:
    """``config.data.options`` for the ``text`` task on the standard library's sources."""
    opts = {"path": stdlib_path(), "extensions": ".py", "exclude": ",".join(EXCLUDE)}
    opts.update(overrides)
    return opts
