"""Which build of the data path runs: `compiled` (Cython) or `pure` (the .py files).

setup.py compiles the modules in COMPILED from their own .py files when Cython
and a C compiler are there; the extension module then sits next to the .py
file and Python's import prefers it. pgmux/__init__ puts SourceFinder first on
sys.meta_path before any of them is imported; it loads the .py file instead
of the extension when PGMUX_PURE=1 is set, or when the .py file changed after
it was compiled (in a checkout built in place, `make compile` catches up), so a
stale extension never runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ExtensionFileLoader, ModuleSpec
from types import ModuleType

# The data path that runs per message and transaction (setup.py reads this list).
COMPILED = (
    "pgmux.protocol.framing",
    "pgmux.protocol.accounting",
    "pgmux.protocol.backend",
    "pgmux.proxy.base.stats",
    "pgmux.proxy.datapath.replies",
    "pgmux.proxy.datapath.client",
    "pgmux.proxy.datapath.server",
    "pgmux.proxy.datapath.translator",
    "pgmux.proxy.datapath.pool",
)


def pure_requested() -> bool:
    return os.environ.get("PGMUX_PURE", "") not in ("", "0")


def _stale(source: str) -> bool:
    """The C that Cython generated from `source` (an in-place build) is older than it."""
    try:
        return os.stat(source[:-3] + ".c").st_mtime < os.stat(source).st_mtime
    except OSError:  # no generated C next to it: an installed wheel or a pure install
        return False


class SourceFinder(MetaPathFinder):
    """Finds the .py source of a compiled module when its extension must not run."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in COMPILED or not path:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        pure = pure_requested()
        for entry in path:
            source = os.path.join(entry, leaf)
            if os.path.isfile(source):
                if pure or _stale(source):
                    return importlib.util.spec_from_file_location(fullname, source)
                return None  # the usual import: the extension if there is one
        return None


def install() -> None:
    """Called once by pgmux/__init__, before any module of COMPILED is imported."""
    if not any(isinstance(finder, SourceFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceFinder())


def _is_compiled(name: str) -> bool:
    module = sys.modules.get(name)
    spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
    return spec is not None and isinstance(spec.loader, ExtensionFileLoader)


def build() -> str:
    """`compiled`, `pure`, or `partly compiled (k/n)` if some modules did not compile."""
    compiled = sum(_is_compiled(name) for name in COMPILED)
    if compiled == len(COMPILED):
        return "compiled"
    if compiled == 0:
        return "pure"
    return f"partly compiled ({compiled}/{len(COMPILED)})"
