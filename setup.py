"""Compile pgmux's data path with Cython when it can; install pure Python when it cannot.

The modules in COMPILED are compiled from their own .py files (Cython's pure
Python mode: the .py file is the only source). Without Cython or a C compiler,
or when one module fails to compile, the install goes on and that module runs
from its .py file. PGMUX_PURE=1 at run time ignores compiled modules
(pgmux/build.py). Compiling is opt-in for now: PGMUX_COMPILE=1 at install time
(`make compile`); without it the install is pure Python.
"""

from __future__ import annotations

import os
import runpy
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _source(module: str) -> str:
    """pgmux.protocol.x -> protocol/x.py, pgmux.proxy.a.b -> proxy/a/b.py (package-dir)."""
    return "/".join(module.split(".")[1:]) + ".py"


# The module list lives in pgmux/build.py, which also reports the build at run time.
COMPILED = {name: _source(name) for name in runpy.run_path("pgmux/build.py")["COMPILED"]}

DIRECTIVES = {
    "language_level": 3,
    # Annotations stay hints, as in CPython: `data: bytes` must still accept a
    # bytearray, and an `int` may still be a bool. Types come only from explicit
    # cython.* declarations.
    "annotation_typing": False,
    "binding": True,  # functions keep their signatures and can be inspected or patched
    "embedsignature": True,
}


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: a module it cannot compile stays pure."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # no compiler at all
            self._skip("all modules", error)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as error:
            self._skip(ext.name, error)

    def _skip(self, what: str, error: Exception) -> None:
        print(f"pgmux: not compiled ({what}), running as pure Python: {error}", file=sys.stderr)


def extensions() -> list:
    if os.environ.get("PGMUX_COMPILE", "0") != "1":
        return []  # opt-in until CI runs the whole suite compiled (docs/performance.md)
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:
        print("pgmux: Cython is missing, installing pure Python", file=sys.stderr)
        return []
    modules = [Extension(name, [path]) for name, path in COMPILED.items()]
    try:
        return cythonize(modules, compiler_directives=DIRECTIVES, quiet=True)
    except Exception as error:
        print(f"pgmux: Cython failed, installing pure Python: {error}", file=sys.stderr)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
